"""``python -m benchmarks.compile_report``: the margin-softmax kernels compiled for sm_90, read on a CPU.

Triton compiles for a named target without a GPU, and the CUDA tools it ships
(``triton/backends/nvidia/bin``: ``ptxas``, ``cuobjdump``) read the result. For each kernel at
the tile configuration the launcher would use on an H100/H200 (``default_config``), and for each
operand dtype, this reports:

* registers per thread, spill stores/loads (``ptxas -v``), shared memory, CTAs per SM;
* the wgmma instruction shapes (``HGMMA.MxNxK``) in the machine code;
* the hot loop (see :func:`hot_loop`): its instructions outside the nested K loop (the epilogue:
  exp2, masks, the online log-sum-exp or the gradient, stores, and whatever the software
  pipeliner peeled out of the K loop) per logit element a thread owns (``BLOCK_B * BLOCK_C / threads``).

Then the work of one training step at the headline shape (:mod:`benchmarks.step_cost`): FLOPs and
DRAM bytes of every kernel and GEMM, and a roofline estimate of its time.

It writes ``benchmarks/results/sm90-compile-triton<version>.md`` (``--json`` prints the rows instead). The
kernels must not be imported under ``TRITON_INTERPRET=1`` (the interpreter replaces them).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks import step_cost
from fastpfc.kernels import INTERPRET, TileConfig, default_config
from fastpfc.kernels.margin_softmax import _partial_lse_kernel, _softmax_grad_kernel, dot_options

RESULTS = Path(__file__).parent / "results"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SM90 = GPUTarget("cuda", 90, 32)
#: H100/H200: registers and shared memory of one SM, and its resident-CTA limit.
SM90_REGISTERS, SM90_SHARED, SM90_MAX_CTAS = 65536, 232448, 32
#: name -> (kernel, constexprs beyond the tiles): the forward, the forward that also stores
#: numerators, and the softmax-gradient tile of the backward.
KERNELS = {"partial_lse": (_partial_lse_kernel, {"STORE": False, "FILTER": False}),
           "partial_lse+store": (_partial_lse_kernel, {"STORE": True, "FILTER": False}),
           "softmax_grad": (_softmax_grad_kernel, {"FILTER": False})}
#: Operand dtypes: the unit embeddings and unit centers share one.
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class CompiledKernel:
    kernel: str
    dtype: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    ctas_per_sm: int
    wgmma: str
    hot_loop_instructions: int
    k_loop_instructions: int
    epilogue_per_element: float


def _signature(kernel, dtype: torch.dtype, config: TileConfig) -> dict[str, str]:
    """Triton types of ``kernel``'s arguments as the launchers pass them: operand descriptors and
    the gradient tile in ``dtype``, stored numerators in bf16 for half operands."""
    operand, stored = _TRITON_TYPES[dtype], "fp32" if dtype == torch.float32 else "bf16"
    b, c, d = config.block_b, config.block_c, config.block_d
    descriptors = {"x_desc": f"{operand}[{b}, {d}]", "w_desc": f"{operand}[{c}, {d}]",
                   "numerators_desc": f"{stored}[{b}, {c}]", "out_desc": f"{operand}[{b}, {c}]"}
    signature = {}
    for name in kernel.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_desc"):
            signature[name] = f"tensordesc<{descriptors[name]}>"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name == "target_pos_ptr" else "*fp32"
        else:
            signature[name] = "fp32" if name in ("scale", "filter_threshold") else "i32"
    return signature


def compile_sm90(name: str, dtype: torch.dtype, config: TileConfig):
    """``triton.compile`` of kernel ``name`` for sm_90 with ``config``'s tiles (fp32 as "ieee")."""
    kernel, extra = KERNELS[name]
    options = dot_options(dtype, on_cuda=True)  # what the launcher picks on a GPU (fp32: 3xTF32)
    constants = {**extra, "BLOCK_B": config.block_b, "BLOCK_C": config.block_c, "BLOCK_D": config.block_d,
                 **options}
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
    source = ASTSource(kernel, _signature(kernel, dtype, config), constexprs=constexprs)
    return triton.compile(source, target=SM90, options={"num_warps": config.num_warps,
                                                         "num_stages": config.num_stages})


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        command = [str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(path), "-o", str(path.with_suffix(".o"))]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    info = done.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return registers, int(spills.group(1)), int(spills.group(2))


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction of ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    return [(int(address, 16), op.strip()) for address, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def hot_loop(sass: list[tuple[int, str]]) -> tuple[int, int]:
    """(instructions of the hot loop, instructions of the loops nested in it).

    Loops are read off backward branches (``BRA target`` at address ``a`` with ``target < a``
    spans ``[target, a]``) in the kernel's body, up to its last ``EXIT``: past it lie the
    out-of-line slow paths (barrier retry loops that branch back into the body), which are not
    loops of the kernel. The hot loop is the largest loop that holds another (the K loop of the
    cosine tile): the loop over class tiles of the forward. A kernel whose programs own one tile
    (the softmax gradient) has no such loop; then its whole body is the hot region and its
    largest loop the K loop.
    """
    exits = [address for address, op in sass if re.match(r"(@!?U?P\w+\s+)?EXIT\b", op)]
    body = [(a, op) for a, op in sass if a <= (exits[-1] if exits else sass[-1][0])]
    loops = []
    for address, op in body:
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", op)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))

    def inside(inner: tuple[int, int], outer: tuple[int, int]) -> bool:
        return inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1]

    def size(span: tuple[int, int]) -> int:
        return sum(1 for a, _ in body if span[0] <= a <= span[1])

    if not loops:
        return 0, 0
    holding = [span for span in loops if any(inside(other, span) for other in loops)]
    if holding:
        hot = max(holding, key=lambda span: span[1] - span[0])
    else:
        hot = (body[0][0], body[-1][0])
        loops = [max(loops, key=size)]
    nested = [span for span in loops if inside(span, hot)]
    direct = [span for span in nested if not any(inside(span, other) for other in nested)]
    return size(hot), sum(size(span) for span in direct)


def analyse(name: str, dtype: torch.dtype, config: TileConfig) -> CompiledKernel:
    compiled = compile_sm90(name, dtype, config)
    registers, spill_stores, spill_loads = _ptxas_usage(compiled.asm["ptx"])
    sass = _sass(compiled.asm["cubin"])
    threads = 32 * config.num_warps
    shared = compiled.metadata.shared
    by_shared = SM90_SHARED // shared if shared else SM90_MAX_CTAS
    ctas = min(SM90_MAX_CTAS, SM90_REGISTERS // (registers * threads), by_shared)
    shapes = sorted({re.match(r"HGMMA\.(\w+)", op).group(1) for _, op in sass if op.startswith("HGMMA")})
    total, k_loop = hot_loop(sass)
    per_thread = config.block_b * config.block_c / threads
    tiles = f"B{config.block_b} C{config.block_c} D{config.block_d} w{config.num_warps} s{config.num_stages}"
    return CompiledKernel(name, _TRITON_TYPES[dtype], tiles, registers, spill_stores, spill_loads, shared, ctas,
                          ", ".join(shapes) or "none (FMA)", total, k_loop, round((total - k_loop) / per_thread, 1))


def default_rows() -> list[CompiledKernel]:
    """Every kernel at the launcher's sm_90 tiles, for each operand dtype."""
    return [analyse(name, dtype, default_config(torch.device("cuda"), dtype)) for name in KERNELS for dtype in DTYPES]


def markdown(rows: list[CompiledKernel]) -> str:
    header = ["kernel", "operands", "tiles", "regs", "spill st/ld B", "smem B", "CTAs/SM", "wgmma",
              "hot loop instr", "K loop instr", "epilogue instr / logit element"]
    lines = [f"# Margin-softmax kernels compiled for sm_90 (Triton {triton.__version__})", "",
             "Written by `python -m benchmarks.compile_report` on a CPU-only machine: registers and spills from "
             "`ptxas -v`, the rest from the SASS (`cuobjdump -sass`). Targets (issue 12): zero spills, at most 12 "
             "epilogue instructions per logit element. fp32 operands run as 3xTF32 on the tensor cores "
             "(`torch.get_float32_matmul_precision()` \"highest\"; TF32 when it is lower).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.dtype} | {r.config} | {r.registers} | {r.spill_stores} / {r.spill_loads} | "
                     f"{r.shared_bytes} | {r.ctas_per_sm} | {r.wgmma} | {r.hot_loop_instructions} | "
                     f"{r.k_loop_instructions} | {r.epilogue_per_element} |")
    return "\n".join(lines) + "\n\n" + step_cost.markdown(step_cost.HEADLINE) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of writing")
    args = parser.parse_args(argv)
    if INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: under the interpreter the kernels cannot be compiled")
    rows = default_rows()
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sm90-compile-triton{triton.__version__}.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
