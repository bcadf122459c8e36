"""The C++ kernels on other toolchains, checked as far as a Linux x86 machine can: every platform's flags (a
pure function), the torch-free kernels cross-compiled for aarch64 (NEON and SVE) and run under qemu-user
against the reference, their hot loops vectorised there, the torch-facing sources compiled for aarch64, and
clang builds in the flag sets Linux and macOS use (MSVC's flags are checked as flags only).

The compilers and qemu come from the distribution's packages (``.ci/run`` installs them); without them these
tests skip, unless ``VISIONMAMBA_REQUIRE_TOOLCHAINS=1`` (set by CI) makes a missing tool a failure.
"""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from visionmamba.deploy import runtime_kernels
from visionmamba.ops.scan import cpu, reference, toolchain

DRIVER = Path(__file__).with_name("csrc") / "mixer_driver.cpp"
CROSS, QEMU, CLANG = "aarch64-linux-gnu-g++", "qemu-aarch64", "clang++"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"  # the cross toolchain's libraries, for qemu-user


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("VISIONMAMBA_REQUIRE_TOOLCHAINS") == "1":
            pytest.fail(f"{name} is missing (CI installs it: see .ci/run)")
        pytest.skip(f"{name} is not installed")
    return path


# ----------------------------------------------------------------------------------- the flags per platform
@pytest.mark.parametrize("kind, system, machine, capability, features, expect, refuse", [
    ("gcc", "linux", "x86_64", "AVX512", (), ("-march=x86-64-v4", "-fopenmp"), ("-march=native",)),
    ("gcc", "linux", "x86_64", "AVX2", (), ("-march=x86-64-v3", "-fopenmp"), ("-march=native",)),
    ("gcc", "linux", "x86_64", "DEFAULT", (), ("-march=x86-64",), ("-march=native",)),
    ("clang", "linux", "x86_64", "AVX2", (), ("-march=x86-64-v3", "-fopenmp"), ()),
    ("gcc", "linux", "aarch64", "DEFAULT", (), ("-march=armv8-a",), ("-march=armv8-a+sve",)),
    ("gcc", "linux", "aarch64", "SVE256", ("sve", "asimd"), ("-march=armv8-a+sve",), ()),
    ("apple-clang", "darwin", "arm64", "DEFAULT", (), ("-Xclang", "-fopenmp-simd"), ("-fopenmp", "-march=armv8-a")),
    ("apple-clang", "darwin", "x86_64", "AVX2", (), ("-march=x86-64-v3",), ("-fopenmp",)),
    ("msvc", "windows", "AMD64", "AVX512", (), ("/arch:AVX512", "/openmp:experimental", "/O2"), ("-O3",)),
    ("msvc", "windows", "AMD64", "AVX2", (), ("/arch:AVX2", "/fp:fast"), ("-fopenmp",)),
])
def test_each_platform_gets_its_compilers_flags(kind, system, machine, capability, features, expect, refuse):
    flags = toolchain.flags_for(kind, system, machine, capability, frozenset(features))
    for flag in expect:
        assert flag in flags.cflags, (flag, flags)
    for flag in refuse:
        assert flag not in flags.cflags, (flag, flags)
    assert flags.level and flags.threads


def test_apple_clang_threads_with_libomp_and_says_how_to_get_it():
    without = toolchain.flags_for("apple-clang", "darwin", "arm64")
    assert without.threads.startswith("one thread") and "brew install libomp" in without.threads
    assert not without.ldflags
    prefix = "/opt/homebrew/opt/libomp"
    found = toolchain.flags_for("apple-clang", "darwin", "arm64", openmp_prefix=prefix)
    assert ("-Xclang", "-fopenmp") == found.cflags[found.cflags.index("-Xclang"):][:2]
    assert f"{prefix}/include" in found.cflags and "-lomp" in found.ldflags and prefix in found.threads
    assert found.simd_cflags == without.simd_cflags  # the runtimes' libraries never link an OpenMP runtime
    # torch's wheel bundles a libomp: link that one (a second copy in the process aborts it), header from the prefix
    torch_lib = "/site-packages/torch/lib"
    bundled = toolchain.flags_for("apple-clang", "darwin", "arm64", openmp_prefix=prefix, openmp_lib=torch_lib)
    assert f"-L{torch_lib}" in bundled.ldflags and f"{prefix}/include" in bundled.cflags
    assert not any(prefix in flag for flag in bundled.ldflags)


@pytest.mark.parametrize("banner, kind", [
    ("Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23.4.0", "apple-clang"),
    ("Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu", "clang"),
    ("c++ (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022 Free Software Foundation, Inc.", "gcc"),
    ("Microsoft (R) C/C++ Optimizing Compiler Version 19.38.33133 for x64", "msvc"),
    ("icpx: Intel(R) oneAPI DPC++/C++ Compiler", "unknown"),
])
def test_the_compiler_is_known_by_its_banner(banner, kind):
    assert toolchain.kind_of_banner(banner) == kind


def test_this_machines_compiler_is_identified():
    chain = toolchain.toolchain()
    assert chain.kind in ("gcc", "clang") and chain.version
    assert toolchain.compiler_identity("no-such-compiler-here")[0] == "missing"


def test_libomp_is_found_where_users_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    good, bad = tmp_path / "libomp", tmp_path / "empty"
    (good / "include").mkdir(parents=True)
    (good / "include" / "omp.h").write_text("")
    (good / "lib").mkdir()
    (good / "lib" / "libomp.dylib").write_text("")
    bad.mkdir()
    monkeypatch.setenv("OMP_PREFIX", str(bad))
    assert toolchain.libomp_prefix(candidates=()) is None
    assert toolchain.libomp_prefix(candidates=(str(good),)) == str(good)  # Homebrew's place
    monkeypatch.setenv("OMP_PREFIX", str(good))
    assert toolchain.libomp_prefix(candidates=()) == str(good)


def test_the_cache_name_follows_the_toolchain():
    """Two compilers, levels or threading choices never share a cached binary."""
    base = toolchain.toolchain()
    other = [toolchain.Toolchain("clang++", "clang", "Debian clang 14", base.system, base.machine, base.flags),
             toolchain.Toolchain(base.compiler, base.kind, base.version, "linux", "aarch64",
                                 toolchain.flags_for(base.kind, "linux", "aarch64", cpu_features=frozenset({"sve"})))]
    names = {cpu.extension_name(chain) for chain in (base, *other)}
    assert len(names) == 3 and any("armv8_a_sve" in name for name in names)


def test_the_runtime_library_command_per_compiler(tmp_path):
    gnu = toolchain.Toolchain("g++", "gcc", "12", "linux", "x86_64", toolchain.flags_for("gcc", "linux", "x86_64"))
    msvc = toolchain.Toolchain("cl", "msvc", "19", "windows", "x86_64", toolchain.flags_for("msvc", "windows", "AMD64"))
    src, out = tmp_path / "op.cpp", tmp_path / "op.dll"
    command = toolchain.shared_library_command(gnu, src, out, ["inc"], [], hide_symbols=True)
    assert {"-shared", "-fPIC", "-fvisibility=hidden", "-fopenmp-simd"} <= set(command) and "-fopenmp" not in command
    threaded = toolchain.shared_library_command(gnu, src, out, ["inc"], [], hide_symbols=False, threads=True)
    assert threaded.count("-fopenmp") == 2 and "-fopenmp-simd" not in threaded  # compile and link
    command = toolchain.shared_library_command(msvc, src, out, ["inc"], ["openvino.lib"], hide_symbols=True)
    assert {"/LD", "/Iinc", f"/Fe:{out}"} <= set(command) and command.index("/link") < command.index("openvino.lib")
    assert toolchain.shared_library_suffix("windows") == ".dll" and toolchain.shared_library_suffix("darwin") == ".dylib"


# ------------------------------------------------------------------------------ builds for other machines
def mixer_case(batch: int, length: int, channels: int = 70, state: int = 16, rank: int = 3, taps: int = 4):
    """Random mixer inputs: the driver's input file's arrays and the reference's arguments."""
    g = torch.Generator().manual_seed(batch * 1000 + length)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, z = r(batch, length, channels), r(batch, length, channels)
    conv_w, conv_b = r(2, channels, taps) * .3, r(2, channels) * .1
    xproj_w, dt_w, dt_b = r(2, rank + 2 * state, channels) / 6, r(2, channels, rank) / 2, r(2, channels) * .1
    A, D = -torch.exp(r(2, channels, state) * .3), 1 + .1 * r(2, channels)
    args = (x, z, conv_w, conv_b, xproj_w, dt_w, dt_b, A, D)
    arrays = (x, z, conv_w.transpose(1, 2), conv_b, xproj_w, dt_w, dt_b, A, D)  # the driver's conv weight (2, K, E)
    dims = np.array([batch, length, channels, state, rank, taps], dtype=np.int64)
    blob = dims.tobytes() + b"".join(a.contiguous().numpy().astype(np.float32).tobytes() for a in arrays)
    return blob, args


def run_driver(command: list, tmp_path: Path, batch: int, length: int, env=None) -> None:
    """Run a built driver on a case and compare it with the reference (float64)."""
    blob, args = mixer_case(batch, length)
    (tmp_path / "in.bin").write_bytes(blob)
    proc = subprocess.run([*command, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32)).reshape(args[0].shape)
    expected = reference.bidirectional(*(a.double() for a in args)).float()
    assert (out - expected).abs().max() <= 2e-5 * expected.abs().max(), (out - expected).abs().max()


def compile_driver(compiler: str, flags: toolchain.Flags, output: Path, extra=()) -> subprocess.CompletedProcess:
    command = [compiler, *flags.cflags, "-std=c++17", "-I", str(cpu.CSRC), str(DRIVER), "-o", str(output),
               *flags.ldflags, *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
    return proc


@pytest.mark.parametrize("features", [(), ("sve",)], ids=["neon", "sve"])
def test_the_aarch64_build_matches_the_reference_under_qemu(features, tmp_path):
    compiler, qemu = tool(CROSS), tool(QEMU)
    flags = toolchain.flags_for("gcc", "linux", "aarch64", cpu_features=frozenset(features))
    compile_driver(compiler, flags, tmp_path / "driver")
    # qemu's "max" CPU has SVE (and NEON); the SVE binary cannot run on an ARM CPU without it, hence the level
    for batch, length in ((2, 37), (1, 1)):
        run_driver([qemu, "-cpu", "max", "-L", AARCH64_SYSROOT, str(tmp_path / "driver")], tmp_path, batch, length)


def loop_lines(header: str, marker: str) -> range:
    """The line numbers from the loop just above the first line holding ``marker`` in a csrc header to that
    line (compilers report a vectorised loop at its ``for`` or at a statement of its body)."""
    lines = (cpu.CSRC / header).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if marker in line)
    start = next(i for i in range(at, -1, -1) if lines[i].lstrip().startswith("for "))
    return range(start + 1, at + 2)


@pytest.mark.parametrize("target", ["aarch64-neon", "aarch64-sve", "x86-64-v3"])
def test_the_portable_hot_loops_are_vectorised(target, tmp_path):
    """Where the AVX-512 intrinsics are not built (ARM, AVX2-only x86) the recurrence and the conv are the
    portable loops: the compiler must turn them into vector code, not a scalar loop per channel."""
    if target.startswith("aarch64"):
        compiler = tool(CROSS)
        flags = toolchain.flags_for("gcc", "linux", "aarch64", cpu_features=frozenset({"sve"} if "sve" in target else ()))
    else:
        compiler = tool("g++")
        flags = toolchain.flags_for("gcc", "linux", "x86_64", "AVX2")
    report = compile_driver(compiler, flags, tmp_path / "driver", extra=("-fopt-info-vec-optimized",)).stderr
    for header, marker in (("scan_lanes.h", "const T a = vexp(dj[e] * An[e]), hv ="), ("conv_silu.h", "out[e] = narrow<O>(v * sigmoid(v))")):
        lines = loop_lines(header, marker)
        assert any(f"{header}:{line}:" in row and "loop vectorized" in row for row in report.splitlines()
                   for line in lines), (header, lines, report[-3000:])


def torch_sources_compile(compiler: str, flags: tuple, tmp_path: Path) -> None:
    """Compile the torch-facing kernel sources with ``flags`` through the front end (parsing, templates
    instantiated, the target's predefined macros and intrinsics: what differs per target), as one unit so that
    ATen's headers are read once, in the C++ standard of torch's headers. bindings.cpp, the module's table of
    functions, holds nothing per target; code generation of ATen's templates at -O3 would take minutes."""
    from torch.utils.cpp_extension import include_paths

    unit = tmp_path / "kernels.cpp"
    unit.write_text("".join(f'#include "{source}"\n' for source in cpu.SOURCES if source != "bindings.cpp"))
    includes = [a for path in (*include_paths(), sysconfig.get_paths()["include"]) for a in ("-isystem", path)]
    proc = subprocess.run([compiler, *flags, "-std=c++20", "-fPIC", *includes, "-I", str(cpu.CSRC), "-fsyntax-only",
                           str(unit)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_torch_sources_compile_for_aarch64(tmp_path):
    flags = toolchain.flags_for("gcc", "linux", "aarch64")
    torch_sources_compile(tool(CROSS), flags.cflags, tmp_path)


def fake_homebrew_libomp(tmp_path: Path) -> str:
    """A libomp prefix laid out as Homebrew's (include/omp.h, lib/libomp.*), made of the distribution's libomp."""
    header = next(iter(sorted(Path("/usr/lib").glob("llvm-*/lib/clang/*/include/omp.h"))), None)
    library = next(iter(sorted(Path("/usr/lib").glob("llvm-*/lib/libomp.so"))), None)
    if header is None or library is None:
        if os.environ.get("VISIONMAMBA_REQUIRE_TOOLCHAINS") == "1":
            pytest.fail("libomp-dev is missing (CI installs it: see .ci/run)")
        pytest.skip("libomp-dev is not installed")
    prefix = tmp_path / "libomp"
    (prefix / "include").mkdir(parents=True)
    (prefix / "lib").mkdir()
    (prefix / "include" / "omp.h").symlink_to(header)
    (prefix / "lib" / "libomp.so").symlink_to(library)
    return str(prefix)


def clang_flag_sets(tmp_path: Path) -> dict:
    capability = torch.backends.cpu.get_cpu_capability()
    return {
        "linux-clang": toolchain.flags_for("clang", "linux", "x86_64", capability),
        # what a Mac's Apple clang gets, on this machine's architecture: with Homebrew's libomp, and without
        "apple-clang-libomp": toolchain.flags_for("apple-clang", "darwin", "x86_64", capability,
                                                  openmp_prefix=fake_homebrew_libomp(tmp_path)),
        "apple-clang-one-thread": toolchain.flags_for("apple-clang", "darwin", "x86_64", capability),
    }


@pytest.mark.parametrize("flag_set", ["linux-clang", "apple-clang-libomp", "apple-clang-one-thread"])
def test_clang_builds_match_the_reference(flag_set, tmp_path):
    compiler = tool(CLANG)
    flags = clang_flag_sets(tmp_path)[flag_set]
    compile_driver(compiler, flags, tmp_path / "driver")
    for batch, length in ((2, 37), (1, 1)):
        run_driver([str(tmp_path / "driver")], tmp_path, batch, length)


def test_the_torch_sources_compile_with_apple_clangs_flags(tmp_path):
    flags = clang_flag_sets(tmp_path)["apple-clang-libomp"]
    torch_sources_compile(tool(CLANG), flags.cflags, tmp_path)


def test_the_onnxruntime_library_builds_with_clang(tmp_path, monkeypatch):
    """The runtimes' library through the toolchain with CXX=clang++: built, and ONNX Runtime loads it."""
    onnxruntime = pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CXX", tool(CLANG))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert toolchain.toolchain().kind == "clang"
    path = runtime_kernels.register_onnxruntime(onnxruntime.SessionOptions())
    assert path.parent == tmp_path / "visionmamba_runtimes" and path.exists()
