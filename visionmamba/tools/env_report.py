"""``visionmamba env``: what a bug report needs about the machine. Versions, the CPU and its instruction-set
level, the compiler and the flags the kernels build with, the GPUs, and which scan backend ``auto`` gives
each device and why. Getting the answer builds the CPU kernels and runs the GPU probe as a first model call
would, so a build error or a failing GPU kernel is in the report, not a traceback."""
import importlib.metadata
import os
import platform
import warnings
from typing import Any, Dict, List, Optional, Tuple

PACKAGES = ("torch", "torchvision", "timm", "triton", "numpy", "safetensors", "onnx", "onnxruntime", "openvino")
VARIABLES = ("VISIONMAMBA_SCAN_BACKEND", "CXX", "OMP_PREFIX", "TORCH_EXTENSIONS_DIR", "ATEN_CPU_CAPABILITY",
             "OMP_NUM_THREADS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve", "sve2", "bf16")


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _auto_backend(device) -> Tuple[str, Optional[str]]:
    """(the backend ``auto`` resolves to on ``device``, None) as the dispatcher decides it, or ("none", why not)."""
    from visionmamba.ops import scan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasons go into the report
        try:
            return scan.resolve_backend("auto", device), None
        except (ValueError, RuntimeError) as err:  # e.g. VISIONMAMBA_SCAN_BACKEND names one that cannot run
            return "none", str(err)


def _cpu_backend() -> Dict[str, str]:
    import torch

    from visionmamba.ops import scan
    from visionmamba.ops.scan import cpu, toolchain

    backend, error = _auto_backend(torch.device("cpu"))
    flags = toolchain.toolchain().flags
    built = (f"C++ kernels built ({flags.level}, {flags.threads})" if cpu.available()
             else f"C++ kernels unavailable: {cpu.build_error()}")
    forced = os.environ.get(scan.BACKEND_ENV)
    why = error or (f"{scan.BACKEND_ENV}={forced} ({built})" if forced else built)
    return {"device": "cpu", "backend": backend, "why": why}


def _gpu_backends() -> List[Dict[str, Any]]:
    import torch

    from visionmamba.ops import scan
    from visionmamba.ops.scan import probe

    if not torch.cuda.is_available():
        return []
    rows = []
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(device)
        backend, error = _auto_backend(device)
        forced = os.environ.get(scan.BACKEND_ENV)
        if error or forced:
            why = error or f"{scan.BACKEND_ENV}={forced}"
        elif not scan.triton_available():
            why = "Triton is not installed (pip install triton)"
        else:
            cause = probe.failure("cuda", index)  # what auto's decision rested on (tried once, cached)
            why = (f"the Triton kernels failed the first-use check: {cause}" if cause
                   else f"Triton {package_version('triton')}, the first-use check passed")
        rows.append({"device": str(device), "name": torch.cuda.get_device_name(device),
                     "capability": f"sm_{major}{minor}",
                     "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                     "backend": backend, "why": why})
    return rows


def _runtime_libraries() -> Dict[str, str]:
    """Whether each deployment runtime's kernel library is built (not built here: that waits for first use)."""
    from visionmamba.deploy import runtime_kernels

    found = {}
    for runtime in runtime_kernels.RUNTIMES:
        if package_version(runtime.name) is None:
            found[runtime.name] = "not installed"
            continue
        try:
            path = runtime_kernels.library_path(runtime)
        except Exception as err:  # the runtime does not import: its own error says why
            found[runtime.name] = f"unusable: {type(err).__name__}: {err}"
            continue
        found[runtime.name] = f"built: {path}" if path.exists() else f"built at first use into {path.parent}"
    return found


def report() -> Dict[str, Any]:
    """The report as a dictionary (what ``--json`` prints)."""
    import torch

    from visionmamba.ops.scan import toolchain
    from visionmamba.version import __version__

    chain = toolchain.toolchain()
    features = toolchain.cpu_features()
    return {
        "visionmamba": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "cpu": {"model": toolchain.cpu_model(), "cores": os.cpu_count(), "machine": chain.machine,
                "flags": [f for f in CPU_FLAGS if f in features], "kernel_level": chain.flags.level},
        "compiler": {"command": chain.compiler, "kind": chain.kind, "version": chain.version,
                     "cflags": list(chain.flags.cflags), "ldflags": list(chain.flags.ldflags),
                     "threads": chain.flags.threads},
        "backends": [_cpu_backend(), *_gpu_backends()],
        "runtime_libraries": _runtime_libraries(),
        "environment": {name: os.environ[name] for name in VARIABLES if name in os.environ},
    }


def format_report(data: Dict[str, Any]) -> str:
    """The report as aligned text, one fact per line."""
    lines = [f"visionmamba {data['visionmamba']}, {data['python']}, {data['platform']}"]
    cpu = data["cpu"]
    lines.append(f"cpu: {cpu['model']}, {cpu['cores']} threads, {cpu['machine']}, flags {' '.join(cpu['flags']) or '-'}")
    torch_info = data["torch"]
    lines.append(f"torch: {torch_info['version']} (CUDA {torch_info['cuda'] or '-'}, {torch_info['threads']} threads,"
                 f" capability {torch_info['cpu_capability']})")
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in data["packages"].items() if v)
                 + "; missing: " + (", ".join(k for k, v in data["packages"].items() if not v) or "-"))
    c = data["compiler"]
    lines.append(f"compiler: {c['command']} ({c['kind']}: {c['version']})")
    lines.append(f"  flags: {' '.join(c['cflags'])}; link: {' '.join(c['ldflags']) or '-'}; {c['threads']}")
    lines.append("backends (what backend='auto' runs):")
    for row in data["backends"]:
        name = f" {row['name']} {row['capability']} {row['memory_gib']} GiB" if "name" in row else ""
        lines.append(f"  {row['device']}{name}: {row['backend']} - {row['why']}")
    lines.append("runtime libraries:")
    lines.extend(f"  {name}: {state}" for name, state in data["runtime_libraries"].items())
    env = data["environment"]
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "-"))
    return "\n".join(lines)
