"""visionmamba.files: atomic writes and image listing."""
import pytest

from visionmamba.files import atomic_write, list_images


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"done"))
    assert target.read_bytes() == b"done"

    def failing(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"done" and sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_list_images_recurses_sorted_and_filters_suffixes(tmp_path):
    for name in ("b/2.PNG", "a/1.jpg", "a/notes.txt", "c.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])] == ["a/1.jpg", "b/2.PNG", "c.webp"]
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        list_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        list_images([tmp_path / "empty"])


def test_atomic_write_follows_the_umask_and_clears_temporaries_of_killed_writers(tmp_path):
    import os
    import subprocess
    import sys

    from visionmamba.files import _host

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".a.bin.{_host()}.{int(dead.stdout)}.abc.tmp"  # what a SIGKILL mid-save leaves
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / f".a.bin.{_host()}.{os.getpid()}.live.tmp"  # a live writer's: kept
    mine.write_bytes(b"being written")
    atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").write(b"y"))
    assert not stale.exists() and mine.exists() and (tmp_path / "a.bin").read_bytes() == b"y"


def test_a_full_disk_is_named_and_the_old_file_kept(tmp_path):
    import errno

    from visionmamba.files import OutputError

    atomic_write(tmp_path / "ckpt.pth", lambda tmp: open(tmp, "wb").write(b"good"))

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="no space left on the disk of .*ckpt.pth.*unchanged"):
        atomic_write(tmp_path / "ckpt.pth", full)
    assert (tmp_path / "ckpt.pth").read_bytes() == b"good"


def test_output_folders_that_cannot_be_used_are_one_line_errors(tmp_path, monkeypatch):
    import os

    from visionmamba.files import OutputError, prepare_output_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_output_dir(tmp_path / "file" / "run")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root ignores the mode bits)
    with pytest.raises(OutputError, match="permission denied"):
        prepare_output_dir(tmp_path / "ro")


# Windows simulated: msvcrt.locking's documented semantics (a locked region is refused to any other
# descriptor, in this process or another, until it is unlocked, closed or its process ends) on flock, which
# has them too; the lock code then takes its Windows path. A stand-in, since no Windows machine runs CI.
FAKE_MSVCRT = """
import fcntl, os, sys, types
import visionmamba.files
def locking(fd, mode, nbytes):
    assert nbytes == 1 and os.lseek(fd, 0, os.SEEK_CUR) == visionmamba.files._WINDOWS_LOCK_OFFSET
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if mode == 2 else fcntl.LOCK_UN)
    except BlockingIOError:
        raise PermissionError(13, "Permission denied") from None
sys.modules["msvcrt"] = types.SimpleNamespace(locking=locking, LK_NBLCK=2, LK_UNLCK=0)
visionmamba.files.WINDOWS = True
"""


@pytest.mark.parametrize("platform", ["posix", "windows"])
def test_folder_lock_is_exclusive_and_released_by_a_killed_holder(tmp_path, platform, monkeypatch):
    import signal
    import subprocess
    import sys

    from visionmamba.files import FolderLock, OutputError

    if platform == "windows":
        monkeypatch.setitem(sys.modules, "msvcrt", None)  # restored after the test
        monkeypatch.setattr("visionmamba.files.WINDOWS", True)
        exec(FAKE_MSVCRT, {})
        assert sys.modules["msvcrt"] is not None
    setup = FAKE_MSVCRT if platform == "windows" else ""
    with FolderLock(tmp_path):
        with pytest.raises(OutputError, match="in use by another run .*pid"):
            FolderLock(tmp_path).__enter__()
    holder = subprocess.Popen([sys.executable, "-c", (
        f"{setup}\nimport sys, time\nfrom visionmamba.files import FolderLock\n"
        f"lock = FolderLock({str(tmp_path)!r}).__enter__()\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputError, match=f"pid {holder.pid} on "):  # the holder's line stays readable
        FolderLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with FolderLock(tmp_path):  # no stale lock
        pass
    assert (tmp_path / FolderLock.NAME).read_bytes().endswith(b"\n")


def test_missing_paths_say_what_they_are(tmp_path):
    from visionmamba.files import require_file, require_folder

    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a folder, not a file"):
        require_file(tmp_path, "checkpoint")
    with pytest.raises(ValueError, match="is empty"):
        require_file(tmp_path / "empty.pth", "checkpoint")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        require_folder(tmp_path / "empty.pth", "image folder")


def test_hidden_files_are_passed_over_in_folders(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.jpg", "a/._x.jpg", ".cache/y.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images([tmp_path])] == ["x.jpg"]
    assert list_images([tmp_path / "a" / "._x.jpg"])  # named directly: taken


def test_process_facts_on_this_platform_and_the_ru_maxrss_units(monkeypatch):
    import builtins
    import os
    import resource
    import subprocess
    import sys

    from visionmamba import files
    from visionmamba.ops import rss as process

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert files._process_alive(os.getpid()) and not files._process_alive(int(done.stdout))
    vm_hwm = process.peak_rss_mb()
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: (_ for _ in ()).throw(OSError("no /proc"))
                        if str(path).startswith("/proc") else real_open(path, *a, **k))
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert process.peak_rss_mb() == kilobytes / 1024 and abs(kilobytes / 1024 - vm_hwm) < 0.2 * vm_hwm + 64
    monkeypatch.setattr(sys, "platform", "darwin")  # macOS reports bytes
    assert process.peak_rss_mb() == kilobytes / 2**20
