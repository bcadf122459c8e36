"""What the GPU kernels cost, read from their machine code: no GPU needed.

Compiles every Triton kernel of the project for sm_80 and sm_90 (float32 and bfloat16 activations, every
autotune config) exactly as the launchers would launch it for Vim-Ti (the launch functions of
``visionmamba.ops.scan.triton`` build the arguments; Triton's own specialisation rules turn them into the
signature), disassembles the cubin with the ``cuobjdump`` shipped in Triton's wheel and prints per kernel
and config: registers, spills (local memory), shared memory, resident programs per SM, and for each
innermost loop its SASS instruction count, MUFU and barrier counts per iteration. For the scan kernels it
derives the thread-instructions per state-element-step (loop instructions / state elements a thread
holds) and the issue-bound images/s of Vim-Ti's scans on an H100 at 224, 1248 and 2048 (every SASS
instruction issued once, nothing ever stalling: an upper bound, not a forecast). The special-function
unit (MUFU: exp2, log2, reciprocal) completes 16 results a cycle per SM against 128 issued instructions,
so a MUFU instruction costs 8 issue slots' worth of time; the bound is the larger of the two.

    python benchmarks/gpu_static.py                 # the table
    python benchmarks/gpu_static.py --sass out/     # also write each kernel's SASS

``tests/ops/test_gpu_static.py`` compiles every kernel this way in CI and fails on a spill or a compile error.
"""
import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from visionmamba.ops import norm_triton
from visionmamba.ops.scan import triton as kernels

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# H100 SXM: 132 SMs x 4 schedulers, one warp instruction each per cycle, at 1.98 GHz boost.
H100_THREAD_INSTRUCTIONS_PER_S = 132 * 4 * 1.98e9 * 32
# MUFU throughput on sm_80 and sm_90: 16 results per cycle per SM, against 4 x 32 issued lanes.
ISSUE_SLOTS_PER_MUFU = 4 * 32 // 16
REGISTERS_PER_SM, MAX_PROGRAMS_PER_SM, MAX_WARPS_PER_SM = {80: 65536, 90: 65536}, {80: 32, 90: 32}, {80: 64, 90: 64}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
VIM_TI = dict(dim=192, depth=24, inner=384, state=16, taps=4, patch=16)


@dataclasses.dataclass
class Loop:
    instructions: int
    mufu: int
    barriers: int
    shuffles: int
    histogram: Dict[str, int]


@dataclasses.dataclass
class Report:
    kernel: str
    arch: int
    dtype: str
    config: str
    registers: int
    local_bytes: int
    shared_bytes: int
    programs_per_sm: int
    loops: List[Loop]
    state_elements_per_thread: Optional[int]
    sass: str

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or bool(re.search(r"\b(STL|LDL)\b", self.sass))

    @property
    def per_state_element_step(self) -> Optional[float]:
        """Thread-instructions of one step (the innermost loops, summed: the backward has two) per state element."""
        if not self.state_elements_per_thread:
            return None
        return sum(loop.instructions for loop in self.loops) / self.state_elements_per_thread

    @property
    def mufu_per_state_element_step(self) -> Optional[float]:
        """The step loops' MUFU instructions per state element, in issue slots (x ISSUE_SLOTS_PER_MUFU)."""
        if not self.state_elements_per_thread:
            return None
        return ISSUE_SLOTS_PER_MUFU * sum(loop.mufu for loop in self.loops) / self.state_elements_per_thread


# ------------------------------------------------------------------------------------- the launches
def vim_ti_tensors(dtype: torch.dtype, batch: int = 2, length: int = 197) -> Dict[str, torch.Tensor]:
    """Meta tensors shaped and strided as the mixer's for Vim-Ti (views where the mixer has views)."""
    E, N, K = VIM_TI["inner"], VIM_TI["state"], VIM_TI["taps"]
    meta = dict(device="meta")
    xz = torch.empty(batch, length, 2 * E, dtype=dtype, **meta)
    BC = torch.empty(2, batch, length, 2 * N, **meta)  # cast to float32 by the mixer
    R = -(-VIM_TI["dim"] // 16)  # dt_rank
    dtBC = torch.empty(2, batch, length, R + 2 * N, **meta)  # the same in inference, with dt
    return dict(
        x=xz[..., :E], z=xz[..., E:], u=torch.empty(2, batch, length, E, dtype=dtype, **meta),
        delta=torch.empty(2, batch, length, E, dtype=dtype, **meta), B=BC[..., :N], C=BC[..., N:],
        dt=dtBC[..., :R], dt_weight=torch.empty(2, R, E, **meta),
        A=torch.empty(2, N, E, **meta), D=torch.empty(2, E, **meta), bias=torch.empty(2, E, **meta),
        conv_w=torch.empty(2, E, K, **meta), conv_b=torch.empty(2, E, **meta),
        ys=torch.empty(2, batch, length, E, dtype=dtype, **meta),
        dout=torch.empty(batch, length, E, dtype=dtype, **meta),
    )


def launches(dtype: torch.dtype) -> Iterator[Tuple[str, object, Dict[str, object], Optional[int]]]:
    """(name, JIT function, arguments, state elements per program) for every kernel the mixer launches."""
    t = vim_ti_tensors(dtype)
    steps = kernels.CHECKPOINT_STEPS
    ndir, batch, length, channels = t["u"].shape
    states = torch.empty(ndir, batch, triton.cdiv(length, steps), VIM_TI["state"], channels, device="meta")
    scan_inputs = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["bias"], True)
    kernel, _, args = kernels.scan_fwd_launch(*scan_inputs, t["ys"], states, steps)
    yield "scan_fwd", kernel, args, VIM_TI["state"]
    # inference: in place over u, no states, dt_proj fused (delta from the low-rank dt, float32 as the mixer casts it)
    no_states = torch.empty(ndir, batch, 0, VIM_TI["state"], channels, device="meta")
    infer_inputs = (t["u"], t["dt"], *scan_inputs[2:])
    kernel, _, args = kernels.scan_fwd_launch(*infer_inputs, t["u"], no_states, steps, t["dt_weight"])
    yield "scan_fwd_infer", kernel, args, VIM_TI["state"]
    grads = [g if g is None else g.to("meta") for g in kernels.scan_bwd_buffers(t["u"], t["A"], t["z"], steps)]
    kernel, _, args = kernels.scan_bwd_launch(*scan_inputs, states, t["dout"], steps, grads)
    yield "scan_bwd", kernel, args, VIM_TI["state"]
    g = torch.empty(ndir, batch, length, channels, device="meta")
    parts = torch.empty(ndir, batch, 8, channels, VIM_TI["taps"], device="meta"), torch.empty(ndir, batch, 8, channels, device="meta")
    yield "conv_fwd", *kernels.conv_fwd_launch(t["x"], t["conv_w"], t["conv_b"], t["u"])[::2], None
    yield "conv_bwd", *kernels.conv_bwd_launch(t["x"], t["conv_w"], t["conv_b"], t["u"], g, *parts)[::2], None
    yield "conv_dx", *kernels.conv_dx_launch(t["conv_w"], g, t["x"])[::2], None
    rows, dim = batch * length, VIM_TI["dim"]
    hidden, res = torch.empty(rows, dim, dtype=dtype, device="meta"), torch.empty(rows, dim, device="meta")
    rstd, weight = torch.empty(rows, device="meta"), torch.empty(dim, device="meta")
    yield "add_rms_norm_fwd", *norm_triton.fwd_launch(hidden, res, weight, 1e-5, hidden, res, rstd)[::2], None
    dw_part = torch.empty(triton.cdiv(rows, norm_triton.ROWS), dim, device="meta")
    yield "add_rms_norm_bwd", *norm_triton.bwd_launch(hidden, res, res, rstd, weight, hidden, res, dw_part)[::2], None


def configs(kernel, args: Dict[str, object]) -> List[Tuple[Dict[str, object], int]]:
    """(meta-parameters, warps) of each autotune config the kernel may run with these arguments (its prune
    function applied, as the autotuner does); one default config for a plain kernel."""
    if isinstance(kernel, triton.runtime.Autotuner):
        kept = kernel.early_config_prune(kernel.configs, {}, **args) if kernel.early_config_prune else kernel.configs
        return [(dict(c.kwargs), c.num_warps) for c in kept]
    return [({}, 4)]


def jit_function(kernel) -> triton.runtime.JITFunction:
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_for(kernel, args: Dict[str, object], meta: Dict[str, object], warps: int, arch: int):
    """Compiles as Triton's launcher would: its specialisation of every argument (constexpr 1s, 16-byte
    divisibility of integers and pointers) for GPUTarget('cuda', arch)."""
    fn = jit_function(kernel)
    values = {**args, **meta}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))


# ------------------------------------------------------------------------------------- the machine code
def disassemble(cubin: bytes) -> Tuple[str, str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return sass, usage


def instructions(sass: str) -> List[Tuple[int, str]]:
    """(address, instruction) in program order."""
    found = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            found.append((int(m.group(1), 16), m.group(2)))
    return found


def opcode(instruction: str) -> str:
    words = instruction.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def innermost_loops(sass: str) -> List[Loop]:
    """Loops are backward branches; innermost ones contain no other loop. Each is counted once per
    iteration, every instruction between its head and its branch (both sides of any if inside)."""
    code = instructions(sass)
    index = {address: i for i, (address, _) in enumerate(code)}
    spans = []
    for i, (address, text) in enumerate(code):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= address and int(m.group(1), 16) in index:
            spans.append((index[int(m.group(1), 16)], i))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    inner = [s for s in inner if s[1] > s[0]]  # the trailing self-branch of every kernel is not a loop
    loops = []
    for first, last in sorted(inner):
        ops = collections.Counter(opcode(text) for _, text in code[first:last + 1])
        loops.append(Loop(last - first + 1, ops["MUFU"], ops["BAR"], ops["SHFL"], dict(ops.most_common())))
    return loops


def resource(usage: str, name: str) -> int:
    m = re.search(rf"\b{name}:(\d+)", usage)
    return int(m.group(1)) if m else 0


def programs_per_sm(registers: int, shared: int, warps: int, arch: int) -> int:
    """Resident programs per SM: registers (allocated per warp in units of 256), shared memory, warps, blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (REGISTERS_PER_SM[arch] // per_warp) // warps if per_warp else MAX_PROGRAMS_PER_SM[arch]
    by_shared = SHARED_PER_SM[arch] // (shared + 1024)
    return min(by_registers, by_shared, MAX_WARPS_PER_SM[arch] // warps, MAX_PROGRAMS_PER_SM[arch])


def analyse(name: str, kernel, args, states: Optional[int], meta, warps: int, arch: int, dtype: str) -> Report:
    compiled = compile_for(kernel, args, meta, warps, arch)
    sass, usage = disassemble(compiled.asm["cubin"])
    registers, shared = resource(usage, "REG"), resource(usage, "SHARED")
    per_thread = states * meta["BLOCK_E"] // (32 * warps) if states else None
    config = ", ".join(f"{k}={v}" for k, v in meta.items()) + f", warps={warps}"
    return Report(name, arch, dtype, config, registers, resource(usage, "LOCAL") + resource(usage, "STACK"), shared,
                  programs_per_sm(registers, shared, warps, arch), innermost_loops(sass), per_thread, sass)


def reports(archs=ARCHS, dtypes=tuple(DTYPES), kernels_named: Optional[List[str]] = None) -> Iterator[Report]:
    for dtype in dtypes:
        for name, kernel, args, states in launches(DTYPES[dtype]):
            if kernels_named and name not in kernels_named:
                continue
            for arch in archs:
                for meta, warps in configs(kernel, args):
                    yield analyse(name, kernel, args, states, meta, warps, arch, dtype)


# ------------------------------------------------------------------------------------- the bound
def tokens(resolution: int) -> int:
    return (resolution // VIM_TI["patch"]) ** 2 + 1  # patches and the class token


def issue_bound_images_per_s(per_step: float, resolution: int) -> float:
    """Images/s of Vim-Ti's scans alone (``per_step`` issue slots per state-element-step) if an H100 ran
    nothing else and never stalled."""
    per_image = per_step * tokens(resolution) * VIM_TI["inner"] * VIM_TI["state"] * 2 * VIM_TI["depth"]
    return H100_THREAD_INSTRUCTIONS_PER_S / per_image


def table(found: List[Report]) -> str:
    head = ("| kernel | arch | dtype | config | regs | spill B | smem B | programs/SM | loop instrs | MUFU | BAR | SHFL "
            "| per state-elem-step |")
    lines = [head, "|" + "---|" * 13]
    for r in found:
        loops = r.loops or [Loop(0, 0, 0, 0, {})]
        cell = lambda f: " + ".join(str(f(loop)) for loop in loops)  # noqa: E731
        per = f"{r.per_state_element_step:.1f}" if r.per_state_element_step else ""
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.config} | {r.registers} | {r.local_bytes} | "
                     f"{r.shared_bytes} | {r.programs_per_sm} | {cell(lambda x: x.instructions)} | {cell(lambda x: x.mufu)} | "
                     f"{cell(lambda x: x.barriers)} | {cell(lambda x: x.shuffles)} | {per} |")
    return "\n".join(lines)


def bound_table(found: List[Report]) -> str:
    lines = ["| scan (sm_90, bf16) | config | instructions | MUFU x 8 | 224 | 1248 | 2048 |", "|---|---|---|---|---|---|---|"]
    for r in found:
        if r.kernel.startswith("scan_") and r.arch == 90 and r.dtype == "bf16" and r.per_state_element_step:
            per_step = max(r.per_state_element_step, r.mufu_per_state_element_step)
            bounds = [issue_bound_images_per_s(per_step, res) for res in (224, 1248, 2048)]
            lines.append(f"| {r.kernel} | {r.config} | {r.per_state_element_step:.1f} | {r.mufu_per_state_element_step:.1f} | "
                         + " | ".join(f"{b:,.0f}" for b in bounds) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernel", nargs="+", help="only these kernels (scan_fwd, scan_fwd_infer, scan_bwd, conv_fwd, conv_bwd, conv_dx, add_rms_norm_fwd, add_rms_norm_bwd)")
    parser.add_argument("--sass", type=Path, help="folder to write each kernel's SASS into")
    args = parser.parse_args(argv)
    found = list(reports(args.arch, args.dtype, args.kernel))
    print(table(found))
    print("\nPer state-element-step, and the images/s of Vim-Ti's 48 scans (forward, or backward alone) on an H100 if "
          "every instruction issued once, each MUFU took 8 issue slots, and nothing stalled:\n")
    print(bound_table(found))
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
        for r in found:
            safe = re.sub(r"[^A-Za-z0-9_=.-]+", "_", f"{r.kernel}_sm{r.arch}_{r.dtype}_{r.config}")
            (args.sass / f"{safe}.sass").write_text(r.sass)
    spilled = [f"{r.kernel} sm_{r.arch} {r.dtype} {r.config}" for r in found if r.spills]
    if spilled:
        print("\nspills: " + "; ".join(spilled), file=sys.stderr)
    return 1 if spilled else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    sys.exit(main())
