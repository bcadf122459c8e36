"""A deploy bundle: the ONNX files and our runtime kernels, built for this machine, in one folder that a machine
without Python or a compiler can use (``visionmamba export --bundle DIR``).

What it holds: ``MODEL.onnx`` (the fused nodes, with their standard bodies), ``MODEL.standard.onnx`` (standard
operators only), ONNX Runtime's custom-op library and OpenVINO's extension twice each, built for this CPU's
instruction-set level and for the platform's baseline (``*_portable``), ``README.md`` (how to load them from
C++, C#, Java and Python) and ``manifest.json`` (files, checksums, levels, versions). A library loaded on a
CPU without the instructions it was built for refuses with a message naming the portable one
(``csrc/isa_guard.h``). The folder appears whole or not at all.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from visionmamba.deploy import runtime_kernels
from visionmamba.files import OutputError, check_output_folder
from visionmamba.ops.scan import toolchain
from visionmamba.version import __version__

README = Path(__file__).resolve().parent / "bundle_readme.md"  # the bundle's README, with {placeholders}


def check_bundle_folder(folder: Path) -> None:
    """Before any work: the bundle goes into a new or empty folder (nothing a user had is replaced)."""
    import errno

    if folder.exists() and not folder.is_dir():
        raise OutputError(errno.ENOTDIR, f"the bundle folder {str(folder)!r} is a file; choose a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputError(errno.EEXIST, f"the bundle folder {str(folder)!r} is not empty; choose a new or empty folder")
    check_output_folder(folder.parent)


def require_runtimes() -> None:
    """Both runtimes are needed here to build their libraries (their headers and versions)."""
    missing = [name for name in ("onnxruntime", "openvino") if _missing(name)]
    if missing:
        raise ValueError(f"--bundle builds the libraries of ONNX Runtime and OpenVINO, and {' and '.join(missing)} "
                         "is not installed: pip install 'visionmamba[export,openvino]'")


def _missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def library_names(system: str) -> Dict[str, str]:
    """The bundle's file name of each library: ``{runtime}`` and ``{runtime}_portable``."""
    suffix = toolchain.shared_library_suffix(system)
    prefix = "" if system == "windows" else "lib"
    return {f"{r.name}{tag}": f"{prefix}visionmamba_{r.name}{tag}{suffix}" for r in runtime_kernels.RUNTIMES
            for tag in ("", "_portable")}


def write_bundle(folder: Path, model_files: Dict[str, bytes], model: str) -> Dict[str, Any]:
    """Write the bundle into ``folder`` (new or empty): ``model_files`` (name -> serialized ONNX) and both
    runtimes' libraries, built here (seconds each, cached). Returns the manifest."""
    check_bundle_folder(folder)
    chain, portable = toolchain.toolchain(), toolchain.toolchain(portable=True)
    names = library_names(chain.system)
    parent = folder.parent if str(folder.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    try:
        for name, data in model_files.items():
            (staging / name).write_bytes(data)
        libraries = {}
        for runtime in runtime_kernels.RUNTIMES:
            for tag, is_portable in (("", False), ("_portable", True)):
                shutil.copyfile(runtime_kernels.built(runtime, portable=is_portable), staging / names[runtime.name + tag])
                libraries[names[runtime.name + tag]] = {
                    "runtime": runtime.name, "runtime_version": runtime.version(),
                    "isa_level": (portable if is_portable else chain).flags.level}
        manifest = manifest_of(staging, model, model_files, libraries, chain)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / "README.md").write_text(readme(model, list(model_files), names, manifest))
        staging.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; the bundle is for others to read
        if folder.is_dir():
            folder.rmdir()  # empty, checked above
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def manifest_of(staging: Path, model: str, model_files: Dict[str, bytes], libraries: Dict[str, Dict[str, str]],
                chain: toolchain.Toolchain) -> Dict[str, Any]:
    files = sorted([*model_files, *libraries])
    return {
        "model": model,
        "visionmamba": __version__,
        "built_on": {"system": chain.system, "machine": chain.machine, "cpu": toolchain.cpu_model(),
                     "compiler": chain.version},
        "libraries": libraries,
        "sha256": {name: hashlib.sha256((staging / name).read_bytes()).hexdigest() for name in files},
    }


def readme(model: str, onnx_files: List[str], names: Dict[str, str], manifest: Dict[str, Any]) -> str:
    """The bundle's README: how to load the libraries from each language, with this bundle's file names."""
    fused, standard = onnx_files
    levels = {info["runtime"] + ("_portable" if "portable" in name else ""): info["isa_level"]
              for name, info in manifest["libraries"].items()}
    return README.read_text().format(
        model=model, fused=fused, standard=standard, ort=names["onnxruntime"], ort_portable=names["onnxruntime_portable"],
        ov=names["openvino"], ov_portable=names["openvino_portable"], level=levels["onnxruntime"],
        portable_level=levels["onnxruntime_portable"], ort_version=manifest["libraries"][names["onnxruntime"]]["runtime_version"],
        ov_version=manifest["libraries"][names["openvino"]]["runtime_version"], system=manifest["built_on"]["system"],
        machine=manifest["built_on"]["machine"],
    )
