"""``python -m benchmarks.compile_report``: the margin-softmax kernels compiled for sm_90, read on a CPU.

Triton compiles for a named target without a GPU, and the CUDA tools it ships
(``triton/backends/nvidia/bin``: ``ptxas``, ``cuobjdump``) read the result. For each kernel at
the tile configuration the launcher would use on an H100/H200 (``default_config``), and for each
pair of embedding/weight dtypes, this reports:

* registers per thread, spill stores/loads (``ptxas -v``), shared memory, CTAs per SM;
* the wgmma instruction shapes (``HGMMA.MxNxK``) in the machine code;
* the hot loop (see :func:`hot_loop`): its instructions outside the nested K loop (the epilogue:
  exp, masks, loads of per-column data, the second product of the backward kernels, and whatever
  the software pipeliner peeled out of the K loop) per logit element a thread owns
  (``BLOCK_B * BLOCK_C / threads``).

It writes ``benchmarks/results/sm90-compile.md`` (``--json`` prints the rows instead). The
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
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastpfc.kernels import INTERPRET, TileConfig, default_config
from fastpfc.kernels.margin_softmax import _grad_centers_kernel, _grad_embeddings_kernel, _partial_lse_kernel

RESULTS = Path(__file__).parent / "results"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SM90 = GPUTarget("cuda", 90, 32)
#: H100/H200: registers and shared memory of one SM, and its resident-CTA limit.
SM90_REGISTERS, SM90_SHARED, SM90_MAX_CTAS = 65536, 232448, 32
KERNELS = {"partial_lse": _partial_lse_kernel, "grad_embeddings": _grad_embeddings_kernel,
           "grad_centers": _grad_centers_kernel}
#: (embeddings, weight) dtypes: the default fp32 master weight, and a bf16 copy of it.
DTYPE_PAIRS = [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@dataclass
class CompiledKernel:
    kernel: str
    x_dtype: str
    w_dtype: str
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


def _signature(kernel, x_dtype: torch.dtype, w_dtype: torch.dtype) -> dict[str, str]:
    """Triton types of ``kernel``'s arguments as the launchers pass them."""
    pointers = {"x_ptr": _TRITON_TYPES[x_dtype], "w_ptr": _TRITON_TYPES[w_dtype],
                "grad_w_ptr": _TRITON_TYPES[w_dtype], "index_ptr": "i64", "target_pos_ptr": "i64"}
    signature = {}
    for name in kernel.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature


def compile_sm90(name: str, x_dtype: torch.dtype, w_dtype: torch.dtype, config: TileConfig,
                 has_index: bool = True):
    """``triton.compile`` of kernel ``name`` for sm_90 with ``config``'s tiles."""
    kernel = KERNELS[name]
    constants = {"HAS_INDEX": has_index, "STORE": False, "BLOCK_B": config.block_b, "BLOCK_C": config.block_c,
                 "BLOCK_D": config.block_d, "BLOCK_D_OUT": config.block_d_out, "DOT_DTYPE": _DOT_DTYPES[x_dtype],
                 "INPUT_PRECISION": "ieee" if x_dtype == torch.float32 else None}
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items() if k in kernel.arg_names}
    source = ASTSource(kernel, _signature(kernel, x_dtype, w_dtype), constexprs=constexprs)
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
    spans ``[target, a]``); the hot loop is the largest one that holds another loop (the K loop
    of the cosine tile), which is the loop over class tiles (row tiles for the center gradient).
    """
    loops = []
    for address, op in sass:
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", op)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))

    def inside(inner: tuple[int, int], outer: tuple[int, int]) -> bool:
        return inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1]

    def size(span: tuple[int, int]) -> int:
        return sum(1 for a, _ in sass if span[0] <= a <= span[1])

    holding = [span for span in loops if any(inside(other, span) for other in loops)]
    if not holding:
        return 0, 0
    hot = max(holding, key=lambda span: span[1] - span[0])
    nested = [span for span in loops if inside(span, hot)]
    direct = [span for span in nested if not any(inside(span, other) for other in nested)]
    return size(hot), sum(size(span) for span in direct)


def analyse(name: str, x_dtype: torch.dtype, w_dtype: torch.dtype, config: TileConfig) -> CompiledKernel:
    compiled = compile_sm90(name, x_dtype, w_dtype, config)
    registers, spill_stores, spill_loads = _ptxas_usage(compiled.asm["ptx"])
    sass = _sass(compiled.asm["cubin"])
    threads = 32 * config.num_warps
    shared = compiled.metadata.shared
    by_shared = SM90_SHARED // shared if shared else SM90_MAX_CTAS
    ctas = min(SM90_MAX_CTAS, SM90_REGISTERS // (registers * threads), by_shared)
    shapes = sorted({re.match(r"HGMMA\.(\w+)", op).group(1) for _, op in sass if op.startswith("HGMMA")})
    total, k_loop = hot_loop(sass)
    per_thread = config.block_b * config.block_c / threads
    tiles = (f"B{config.block_b} C{config.block_c} D{config.block_d} Dout{config.block_d_out} "
             f"w{config.num_warps} s{config.num_stages}")
    return CompiledKernel(name, _TRITON_TYPES[x_dtype], _TRITON_TYPES[w_dtype], tiles, registers, spill_stores,
                          spill_loads, shared, ctas, ", ".join(shapes) or "none (FMA)", total, k_loop,
                          round((total - k_loop) / per_thread, 1))


def default_rows(dim: int = 512) -> list[CompiledKernel]:
    """Every kernel at the launcher's sm_90 tiles for ``dim``, for each dtype pair."""
    config = default_config(torch.device("cuda"), dim)
    return [analyse(name, x, w, config) for name in KERNELS for x, w in DTYPE_PAIRS]


def markdown(rows: list[CompiledKernel], dim: int) -> str:
    header = ["kernel", "x", "weight", "tiles", "regs", "spill st/ld B", "smem B", "CTAs/SM", "wgmma",
              "hot loop instr", "K loop instr", "epilogue instr / logit element"]
    lines = [f"# Margin-softmax kernels compiled for sm_90 (Triton {triton.__version__}, D = {dim})", "",
             "Written by `python -m benchmarks.compile_report` on a CPU-only machine: registers and spills from "
             "`ptxas -v`, the rest from the SASS (`cuobjdump -sass`). Targets (issue 12): zero spills, at most 12 "
             "epilogue instructions per logit element.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.x_dtype} | {r.w_dtype} | {r.config} | {r.registers} | "
                     f"{r.spill_stores} / {r.spill_loads} | {r.shared_bytes} | {r.ctas_per_sm} | {r.wgmma} | "
                     f"{r.hot_loop_instructions} | {r.k_loop_instructions} | {r.epilogue_per_element} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (picks the default tiles)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of writing")
    args = parser.parse_args(argv)
    if INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: under the interpreter the kernels cannot be compiled")
    rows = default_rows(args.dim)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sm90-compile.md").write_text(markdown(rows, args.dim))
    print(markdown(rows, args.dim))


if __name__ == "__main__":
    main()
