"""How the C++ kernels are compiled here: the compiler, its flags and the OpenMP runtime, chosen per compiler
(GCC, clang, Apple clang, MSVC), operating system and architecture. The PyTorch kernels (``cpu.py``) and the
deployment runtimes' libraries (``deploy/runtime_kernels.py``) both build with what :func:`toolchain` returns, and
their cache names hold its :meth:`Toolchain.key`, so a change of compiler, flags or threading is a new build.

:func:`flags_for` is the choice itself, a pure function of the platform, so that every platform's flags are
tested on any machine; :func:`toolchain` applies it to this machine.
"""
import functools
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Sequence, Tuple

import torch

GNU_OPTIMIZE = ("-O3", "-ffast-math")
MSVC_OPTIMIZE = ("/O2", "/fp:fast")
LIBOMP_PREFIXES = ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp")  # Homebrew on Apple silicon, on Intel
LIBOMP_HINT = "brew install libomp, or set OMP_PREFIX to a folder with include/omp.h and lib/libomp.dylib"


@dataclass(frozen=True)
class Flags:
    """What one platform's build is given: the instruction-set level it targets and how it runs threads."""

    level: str  # the instruction-set level the binary needs, part of the cache name
    cflags: Tuple[str, ...]  # the PyTorch kernels' compile flags (threads from OpenMP where there is one)
    ldflags: Tuple[str, ...]
    simd_cflags: Tuple[str, ...]  # the runtimes' libraries: OpenMP's simd pragmas only (the runtime owns threads)
    threads: str  # how the PyTorch kernels run in parallel, in words


@dataclass(frozen=True)
class Toolchain:
    compiler: str  # the command
    kind: str  # gcc, clang, apple-clang, msvc or unknown
    version: str  # the compiler's first line of --version
    system: str  # linux, darwin, windows
    machine: str  # x86_64 or aarch64 (arm64 is aarch64)
    flags: Flags

    def key(self) -> str:
        """What a cached build depends on besides its sources: compiler, version and flags."""
        f = self.flags
        return " ".join((self.kind, self.version, *f.cflags, *f.ldflags, "|", *f.simd_cflags))


def normal_machine(machine: str) -> str:
    machine = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def x86_level(capability: str) -> str:
    """The x86-64 level of torch's own CPU dispatch (``torch.backends.cpu.get_cpu_capability()``, lowered by
    ``ATEN_CPU_CAPABILITY``): v4 (AVX-512, which the AVX-512 exp path needs), v3 (AVX2 + FMA) or the baseline."""
    return {"AVX512": "x86-64-v4", "AVX2": "x86-64-v3"}.get(capability, "x86-64")


def flags_for(kind: str, system: str, machine: str, capability: str = "DEFAULT",
              cpu_features: FrozenSet[str] = frozenset(), openmp_prefix: Optional[str] = None,
              openmp_lib: Optional[str] = None) -> Flags:
    """The flags of a build by ``kind`` of compiler on ``system``/``machine``.

    Never ``-march=native``: a binary built for the build machine dies (SIGILL) on an older CPU that shares
    the build cache (a home folder on a cluster); the level is named instead and is part of the cache name.
    ``capability`` is torch's CPU capability (x86), ``cpu_features`` the kernel's CPU flags (aarch64: ``sve``),
    ``openmp_prefix`` a libomp installation (Apple clang only: Apple ships no OpenMP runtime) whose header
    is used, ``openmp_lib`` the folder whose libomp is linked (default: the prefix's; torch's own where its
    wheel bundles one, since a second libomp in the process aborts it: "OMP: Error #15").
    """
    machine = normal_machine(machine)
    if kind == "msvc":
        level = x86_level(capability) if machine == "x86_64" else machine
        arch = {"x86-64-v4": ("/arch:AVX512",), "x86-64-v3": ("/arch:AVX2",)}.get(level, ())
        # /openmp:experimental: OpenMP 2.0 threads plus the simd pragmas the lane loops carry
        common = (*MSVC_OPTIMIZE, *arch, "/openmp:experimental")
        return Flags(level, common, (), common, "OpenMP (MSVC vcomp)")
    if machine == "x86_64":
        level = x86_level(capability)
        arch = (f"-march={level}", "-mtune=native")  # tuning only orders legal instructions
    elif machine == "aarch64" and system == "darwin":
        level, arch = "apple-arm64", ()  # Apple's default target has NEON; no M-series has SVE
    elif machine == "aarch64":
        level = "armv8-a+sve" if "sve" in cpu_features else "armv8-a"  # NEON is part of ARMv8-A
        arch = (f"-march={level}",)
    else:
        level, arch = machine or "generic", ()
    base = (*GNU_OPTIMIZE, *arch)
    if kind == "apple-clang":  # the driver refuses -fopenmp: it goes to the compiler proper
        simd = (*base, "-Xclang", "-fopenmp-simd")
        if openmp_prefix is None:
            return Flags(level, simd, (), simd, f"one thread: Apple clang has no OpenMP runtime ({LIBOMP_HINT})")
        cflags = (*base, "-Xclang", "-fopenmp", "-I", f"{openmp_prefix}/include")
        lib = openmp_lib or f"{openmp_prefix}/lib"
        return Flags(level, cflags, (f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"), simd, f"OpenMP (libomp in {lib})")
    runtime = "libomp" if kind == "clang" else "libgomp"
    return Flags(level, (*base, "-fopenmp"), ("-fopenmp",), (*base, "-fopenmp-simd"), f"OpenMP ({runtime})")


def compiler_command() -> str:
    """The C++ compiler torch's cpp_extension runs: ``CXX`` if set, else the platform's default."""
    return os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")


@functools.cache
def compiler_identity(command: str) -> Tuple[str, str]:
    """(kind, first line of its version banner) of ``command``; ("missing", ...) when it does not run."""
    path = shutil.which(command)
    if path is None:
        return "missing", f"{command} not found"
    try:
        args = [path] if Path(path).stem.lower() == "cl" else [path, "--version"]  # cl prints its banner alone
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return "missing", f"{command}: {err}"
    banner = (result.stdout + result.stderr).strip()
    first = banner.splitlines()[0].strip() if banner else command
    return kind_of_banner(banner), first


def kind_of_banner(banner: str) -> str:
    """The compiler kind from its version banner."""
    if "Microsoft" in banner:
        return "msvc"
    if "Apple clang" in banner:
        return "apple-clang"
    if "clang" in banner:
        return "clang"
    if "Free Software Foundation" in banner or "GCC" in banner or "g++" in banner:
        return "gcc"
    return "unknown"


def libomp_prefix(candidates: Sequence[str] = LIBOMP_PREFIXES) -> Optional[str]:
    """A libomp installation for Apple clang: ``OMP_PREFIX`` (as torch's inductor reads it), else conda's,
    else Homebrew's; None when there is none."""
    for prefix in (os.environ.get("OMP_PREFIX"), os.environ.get("CONDA_PREFIX"), *candidates):
        if prefix and (Path(prefix) / "include" / "omp.h").exists() and any((Path(prefix) / "lib").glob("libomp.*")):
            return prefix
    return None


def cpu_features() -> FrozenSet[str]:
    """The kernel's CPU flags of the first processor (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's name, with family and model on x86 Linux (the figures in RESULTS.md are named by them)."""
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            return platform.machine()
    fields: Dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def system_name() -> str:
    return {"win32": "windows", "darwin": "darwin"}.get(sys.platform, "linux" if sys.platform.startswith("linux")
                                                        else sys.platform)


def toolchain(portable: bool = False) -> Toolchain:
    """This machine's toolchain (the compiler is asked its identity once per process); ``portable``: its
    flags for the platform's baseline (x86-64, ARMv8-A) instead of this CPU's level, for binaries that other
    machines load (a deploy bundle's)."""
    command = compiler_command()
    kind, version = compiler_identity(command)
    system, machine = system_name(), normal_machine(platform.machine())
    prefix = libomp_prefix() if kind == "apple-clang" else None
    torch_lib = Path(torch.__file__).parent / "lib"
    bundled = str(torch_lib) if prefix and any(torch_lib.glob("libomp.*")) else None
    capability = "DEFAULT" if portable else torch.backends.cpu.get_cpu_capability()
    features = frozenset() if portable else cpu_features()
    flags = flags_for(kind, system, machine, capability, features, prefix, bundled)
    return Toolchain(command, kind, version, system, machine, flags)


def shared_library_command(chain: Toolchain, source: Path, output: Path, include: Sequence[str],
                           link: Sequence[str], hide_symbols: bool, threads: bool = False,
                           defines: Sequence[str] = ()) -> list:
    """The command that builds ``source`` into the shared library ``output`` (code that links to nothing of
    torch's: the runtimes' kernels, the benchmarks' micro-kernel): ``include`` folders, ``link`` libraries or
    linker arguments; ``hide_symbols``: export only what the source marks (MSVC exports only marked symbols
    anyway); ``threads``: OpenMP threads as the PyTorch kernels have them (else only its simd pragmas: the
    runtimes run their own threads); ``defines``: ``NAME=VALUE`` macros."""
    flags = chain.flags.cflags if threads else chain.flags.simd_cflags
    link = [*link, *(chain.flags.ldflags if threads else ())]
    if chain.kind == "msvc":
        return [chain.compiler, "/nologo", "/LD", "/EHsc", "/std:c++17", *flags, *(f"/D{d}" for d in defines),
                *(f"/I{i}" for i in include), str(source), f"/Fe:{output}", "/link", *link]
    return [chain.compiler, *flags, "-std=c++17", "-shared", "-fPIC", *(["-fvisibility=hidden"] if hide_symbols else []),
            *(f"-D{d}" for d in defines), *(a for i in include for a in ("-I", i)), str(source), "-o", str(output),
            *link]  # libraries after the source: linkers drop unused ones listed first


def shared_library_suffix(system: str) -> str:
    return {"windows": ".dll", "darwin": ".dylib"}.get(system, ".so")
