"""The deployment runtimes' kernels of the ONNX nodes ``visionmamba.BiSelectiveScan`` and ``ConvSiLU``, built at
first use into shared libraries from our C++ sources: the lanes forward of ``ops/scan/csrc/scan_lanes.h`` and
the conv of ``ops/scan/csrc/conv_silu.h`` (which the PyTorch ops ``bi_scan_`` and ``conv_silu`` run too) behind
each runtime's extension interface, whose sources are here, in ``deploy/csrc``.

* ONNX Runtime (``csrc/onnxruntime_op.cpp``): a custom-op library on the runtime's C API. The runtime's wheel
  ships no headers; the library builds against ONNX Runtime's own C API header kept in
  ``csrc/third_party/onnxruntime`` (API version 21; the C API is ABI-stable, so the library loads into any
  ONNX Runtime from 1.21 on) and links to nothing (the runtime hands it its API table).
* OpenVINO (``csrc/openvino_op.cpp``): an extension (the operation, and the ONNX frontend's mapping of the
  node to it) built against the headers and libraries OpenVINO's wheel ships.

Builds are cached by name as the PyTorch kernels are: the runtime, the instruction-set level and a hash of
the sources, flags and runtime version, so machines and environments sharing a cache each keep their own
binary; a cached file that does not load is rebuilt once.
"""
import functools
import hashlib
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from visionmamba.ops.scan import toolchain
from visionmamba.ops.scan.cpu import CSRC as KERNELS

CSRC = Path(__file__).resolve().parent / "csrc"  # the runtimes' extension sources; the kernels' are in KERNELS

ONNXRUNTIME_MIN_VERSION = (1, 21)  # ORT_API_VERSION of the kept header


@dataclass(frozen=True)
class Runtime:
    name: str  # the Python package
    source: str  # under csrc/
    headers: Tuple[str, ...]  # under csrc/, hashed into the build's name

    def version(self) -> str:
        return __import__(self.name).__version__

    def include_and_link(self, system: str) -> Tuple[List[str], List[str]]:
        """(include folders, linker arguments) for the runtime's own headers and libraries (ONNX Runtime: its
        header kept in csrc; it hands the library its API table, so nothing is linked)."""
        if self.name != "openvino":
            return [str(CSRC), str(KERNELS)], []
        root = Path(__import__("openvino").__file__).parent
        libs = root / "libs"
        patterns = {"windows": ("{}.lib",), "darwin": ("lib{}*.dylib",)}.get(system, ("lib{}.so*",))
        found = [next(iter(sorted(f for p in patterns for f in libs.glob(p.format(stem)))), None)
                 for stem in ("openvino", "tbb")]
        if None in found:
            raise RuntimeError(f"OpenVINO's wheel at {root} has no openvino / tbb library to link to")
        rpath = [] if system == "windows" else [f"-Wl,-rpath,{libs}"]
        return [str(CSRC), str(KERNELS), str(root / "include")], [*(str(f) for f in found), *rpath]


ONNXRUNTIME = Runtime("onnxruntime", "onnxruntime_op.cpp", ("isa_guard.h", "third_party/onnxruntime/onnxruntime_c_api.h"))
OPENVINO = Runtime("openvino", "openvino_op.cpp", ("isa_guard.h",))
KERNEL_HEADERS = ("scan_lanes.h", "conv_silu.h", "scan_math.h")  # under ops/scan/csrc, included by both
RUNTIMES = (ONNXRUNTIME, OPENVINO)


def cache_dir() -> Path:
    """Where the libraries are built: beside the PyTorch kernels (TORCH_EXTENSIONS_DIR, else ~/.cache)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root) / "visionmamba_runtimes"


def library_path(runtime: Runtime, portable: bool = False) -> Path:
    """The library's cached file: the runtime, the instruction-set level (this CPU's, or with ``portable`` the
    platform's baseline), a hash of sources, toolchain and runtime version."""
    chain = toolchain.toolchain(portable)
    digest = hashlib.sha1(f"{runtime.version()} {chain.key()}".encode())
    for path in (*(CSRC / n for n in (runtime.source, *runtime.headers)), *(KERNELS / n for n in KERNEL_HEADERS)):
        digest.update(path.read_bytes())
    level = chain.flags.level.replace("-", "_").replace("+", "_")
    suffix = toolchain.shared_library_suffix(chain.system)
    return cache_dir() / f"libvisionmamba_{runtime.name}_{level}_{digest.hexdigest()[:10]}{suffix}"


def build(runtime: Runtime, path: Path, portable: bool = False, defines: Tuple[str, ...] = ()) -> None:
    """Compile the library to ``path`` (atomically: a concurrent or interrupted build leaves no partial file);
    ``portable``: for the platform's baseline; ``defines``: extra ``NAME=VALUE`` macros (the tests' builds)."""
    chain = toolchain.toolchain(portable)
    if chain.kind == "missing":
        raise RuntimeError(f"no C++ compiler: {chain.version} (install one, or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # cl names its outputs by suffix
    include, link = runtime.include_and_link(chain.system)
    command = toolchain.shared_library_command(chain, CSRC / runtime.source, tmp, include, link,
                                               hide_symbols=runtime is ONNXRUNTIME,
                                               defines=(f'VISIONMAMBA_ISA_LEVEL="{chain.flags.level}"', *defines))
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            output = (result.stderr or result.stdout).splitlines()
            lines = [line for line in output if "error" in line] or output[-1:]
            raise RuntimeError(f"{chain.compiler} failed: {lines[0] if lines else result.returncode}")
        os.replace(tmp, path)  # whole or not at all, whoever else builds the same file meanwhile
    finally:
        tmp.unlink(missing_ok=True)


def built(runtime: Runtime, portable: bool = False) -> Path:
    """The library's path, built first if it is not in the cache."""
    path = library_path(runtime, portable)
    if not path.exists():
        build(runtime, path, portable)
    return path


def load_into(runtime: Runtime, load: Any) -> Path:
    """Build the library at first use and hand its path to ``load`` (the runtime's registration call); a
    cached file that does not load (corrupt, truncated, another build's) is rebuilt once. Returns the path."""
    path = library_path(runtime)
    if not path.exists():
        build(runtime, path)
    try:
        load(str(path))
    except Exception:  # the runtimes raise their own error types for a file that does not load
        build(runtime, path)
        load(str(path))
    return path


def check_onnxruntime(onnxruntime: Any) -> None:
    """One line when this ONNX Runtime is older than the library's C API."""
    version = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    if version < ONNXRUNTIME_MIN_VERSION:
        raise RuntimeError(f"visionmamba's ONNX Runtime kernels need onnxruntime >= "
                           f"{'.'.join(map(str, ONNXRUNTIME_MIN_VERSION))}, found {onnxruntime.__version__}")


def register_onnxruntime(options: Any) -> Path:
    """Register the kernel with ``onnxruntime.SessionOptions`` ``options``. Returns the library's path."""
    import onnxruntime

    check_onnxruntime(onnxruntime)
    return load_into(ONNXRUNTIME, options.register_custom_ops_library)


def add_to_openvino(core: Any) -> Path:
    """Add the extension to ``openvino.Core`` ``core`` (then ``read_model`` maps the node to our kernel)."""
    return load_into(OPENVINO, core.add_extension)


@functools.cache
def available(runtime: Runtime) -> Tuple[bool, Optional[str]]:
    """(True, None) when the runtime's library builds and loads here, else (False, the reason); tried once."""
    try:
        if runtime is ONNXRUNTIME:
            import onnxruntime

            register_onnxruntime(onnxruntime.SessionOptions())
        else:
            import openvino

            add_to_openvino(openvino.Core())
    except Exception as err:
        return False, f"{type(err).__name__}: {err}"
    return True, None


def try_load(runtime: Runtime, target: Any) -> bool:
    """Load ``runtime``'s kernels into ``target`` (``onnxruntime.SessionOptions`` or ``openvino.Core``); when
    they cannot be built here, one warning and False: the file's stock bodies run instead."""
    ok, reason = available(runtime)
    if ok:
        (register_onnxruntime if runtime is ONNXRUNTIME else add_to_openvino)(target)
        return True
    warnings.warn(f"visionmamba: our {runtime.name} kernels are unavailable ({reason}); running the stock-operator bodies")
    return False
