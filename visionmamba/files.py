"""Files: writes that never leave half a file, output folders that are checked before the work starts, a lock
that keeps two runs out of one folder, and finding images.

Every user mistake here is a one-line error (:class:`OutputError`, ``FileNotFoundError``) that names the path
and says what to do.
"""
import errno
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

# Image file suffixes read by predict, features and the segmentation folders (lower case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class OutputError(OSError):
    """A file or folder the user asked us to write cannot be written (disk full, read-only, a file in the way)."""


WINDOWS = os.name == "nt"
# Windows' byte-range locks are mandatory (a locked byte cannot be read by another process), so the lock is
# taken on a byte past the holder's line, which a refused run reads to name the holder.
_WINDOWS_LOCK_OFFSET = 1 << 16
_HOLDER_BYTES = 256  # the holder's line, padded: rewritten in place, never truncated under a lock


def _host() -> str:
    return socket.gethostname().replace(".", "-") or "host"


def _process_alive(pid: int) -> bool:
    """True when process ``pid`` exists (another user's included). On Windows ``os.kill(pid, 0)`` would send
    CTRL_C_EVENT to it, so the process is opened for a query instead."""
    if WINDOWS:
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists, another user's
        code = ctypes.c_ulong()
        alive = kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) and code.value == 259  # STILL_ACTIVE
        kernel32.CloseHandle(handle)
        return bool(alive)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``.<name>.<host>.<pid>.*.tmp`` files that a writer on this host left when it was killed."""
    prefix = f".{path.name}.{_host()}."
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``: a reader never sees half a file, and a
    failed write (a full disk) leaves the previous ``path`` as it was. The file gets the permissions the umask
    gives new files; temporaries left by killed writers on this host are removed."""
    path = Path(path)
    prepare_output_dir(path.parent)
    _remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(err.errno, f"no space left on the disk of {str(path)!r} while writing it (any previous "
                                         "version is unchanged); free some space or choose another output folder") from err
        raise


def prepare_output_dir(folder: PathLike) -> Path:
    """Create ``folder`` (and its parents) if needed; an :class:`OutputError` if it cannot hold our files."""
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputError(errno.ENOTDIR, f"cannot use {str(folder)!r} as an output folder: {str(parent)!r} is a file")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(err.errno, f"cannot create the output folder {str(folder)!r}: {err.strerror}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"cannot write into the output folder {str(folder)!r} (permission denied); choose another one")
    return folder


def _lock_exclusive(fd: int) -> bool:
    """Lock the open file ``fd`` without waiting: True, or False when another run holds it. The system
    drops the lock when the descriptor is closed or the process ends, however it ends (``flock`` on POSIX,
    ``msvcrt.locking`` on Windows; both refuse a second descriptor in the same process too)."""
    if WINDOWS:
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class FolderLock:
    """An exclusive lock on a folder (on ``<folder>/.visionmamba.lock``) for as long as a run works in it.

    The system releases it when the process ends, however it ends, so a killed run never leaves a stale lock.
    A second run that asks for it fails at once with an :class:`OutputError` naming the holder.
    """

    NAME = ".visionmamba.lock"

    def __init__(self, folder: PathLike) -> None:
        self.path = prepare_output_dir(folder) / self.NAME
        self._fh: Optional[int] = None

    def __enter__(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666 & ~_umask())
        if not _lock_exclusive(fd):
            holder = os.read(fd, _HOLDER_BYTES).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(errno.EBUSY, f"{str(self.path.parent)!r} is in use by another run ({holder}); wait for it "
                                           "to finish or choose another --output") from None
        line = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, line.encode()[: _HOLDER_BYTES - 1].ljust(_HOLDER_BYTES - 1) + b"\n")
        self._fh = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            os.close(self._fh)  # closing the descriptor releases the lock
            self._fh = None


def check_output_file(path: PathLike, *, overwrite: bool = False, what: str = "output file") -> Path:
    """Check, before any work, that ``path`` can be written as a new file: not a folder, not an existing file
    (unless ``overwrite``), its folder creatable. One-line :class:`OutputError` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(errno.EISDIR, f"the {what} {str(path)!r} is a folder; give a file name inside it "
                                        f"(e.g. {str(path / ('model' + (path.suffix or '.onnx')))!r})")
    if path.exists() and not overwrite:
        raise OutputError(errno.EEXIST, f"the {what} {str(path)!r} already exists; pass --overwrite to replace it, or "
                                        "choose another name")
    check_output_folder(path.parent)
    return path


def check_output_folder(folder: PathLike) -> Path:
    """Check, without creating anything, that ``folder`` is or can become a writable folder."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise OutputError(errno.ENOTDIR, f"cannot use {str(folder)!r} as an output folder: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"cannot write into {str(existing)!r} (permission denied); choose another output")
    return folder


def refuse_existing(paths: Sequence[Path], *, overwrite: bool, what: str = "output") -> None:
    """A one-line :class:`OutputError` when any of ``paths`` exists and ``overwrite`` is not set."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise OutputError(errno.EEXIST, f"{what} {str(existing[0])!r}{more} already exist(s); pass --overwrite to "
                                        "replace them, or choose another output folder")


def require_file(path: PathLike, what: str) -> Path:
    """``path`` as a Path if it is a non-empty file; otherwise a one-line error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is a folder, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty (0 bytes): it was not fully written or downloaded")
    return path


def require_folder(path: PathLike, what: str) -> Path:
    """``path`` as a Path if it is a folder; otherwise a one-line error saying what it is instead."""
    path = Path(path)
    if path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} is a file, not a folder")
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return path


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_images(paths: Sequence[PathLike]) -> List[Path]:
    """Image files named directly or found (recursively, sorted) under folders; files and folders whose names
    start with a dot (e.g. macOS ``._x.jpg`` resource forks) are passed over inside folders."""
    found: List[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and is_image(p) and not _hidden(p, item))
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{str(item)!r} is neither an image file nor a folder")
    if not found:
        raise FileNotFoundError(f"no images found in {[str(p) for p in paths]}")
    return found
