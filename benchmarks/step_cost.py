"""FLOPs and DRAM bytes of one Triton-backend training step, kernel by kernel, and a roofline estimate.

Counts follow what ``fastpfc.triton_backend`` launches for a batch of ``B`` embeddings, ``C``
sampled classes of dimension ``D``: operands in ``operand_bytes`` (2 for bf16), an fp32 master
weight of ``C_total`` rows with a dense fp32 gradient, the softmax gradient ``G`` in the operand
dtype, stored numerators in bf16. Terms of size O(B·D) or O(B + C) are left out.

DRAM bytes count each operand once per kernel: the kernels' grids run the row tiles of one column
range next to each other, so a center tile is read from DRAM once and then from L2 (an upper
bound without that reuse is ``ceil(B / BLOCK_B)`` reads). The estimate is the roofline
``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)`` summed over kernels: a lower bound that
assumes every kernel runs at its ceiling. The ceilings are assumptions until the GPU probe
measures them (``scripts/gpu_probe.sh``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: bf16 dense matmul rate on an H200 as measured by the review quoted in issue 12, FLOP/s.
H200_BF16_FLOPS = 790e12
#: H200 HBM3e bandwidth, NVIDIA's nominal figure (not measured here), bytes/s.
H200_BANDWIDTH = 4.8e12


@dataclass(frozen=True)
class Shape:
    batch: int
    num_sampled: int
    dim: int
    num_total: int
    operand_bytes: int = 2


#: Issue 12's headline: B = 1024, D = 512, 400k sampled classes, bf16 operands, sample rate 1.
HEADLINE = Shape(batch=1024, num_sampled=400_000, dim=512, num_total=400_000)


@dataclass(frozen=True)
class Work:
    name: str
    flops: float
    bytes: float

    def seconds(self, flops_rate: float, bandwidth: float) -> float:
        return max(self.flops / flops_rate, self.bytes / bandwidth)


def step_work(shape: Shape, stored: bool) -> list[Work]:
    """The kernels and GEMMs of one forward + backward, with every column stored (``stored``) or
    none (the lean mode: the backward recomputes each column's ``G`` once)."""
    b, c, d, e = shape.batch, shape.num_sampled, shape.dim, shape.operand_bytes
    matmul = 2.0 * b * c * d
    work = [Work("unit_rows (gather, normalize, cast the sampled centers)", 3.0 * c * d, c * d * (4 + e)),
            Work("partial_lse" + (" + store numerators (bf16)" if stored else ""), matmul,
                 c * d * e + (b * c * 2 if stored else 0))]
    if stored:
        work.append(Work("G from stored numerators (PyTorch, elementwise)", 2.0 * b * c, b * c * (2 + e)))
    else:
        work.append(Work("softmax_grad (recompute, write G)", matmul, c * d * e + b * c * e))
    work += [Work("GEMM G @ w_unit (embedding gradient)", matmul, b * c * e + c * d * e),
             Work("GEMM G^T @ x_unit (center gradient)", matmul, b * c * e + c * d * 4),
             Work("unit_rows_backward_ (backward of w / ||w||, scattered into the gradient)", 4.0 * c * d,
                  c * d * (4 + e + 4)),
             Work("zero the dense fp32 weight gradient", 0.0, shape.num_total * d * 4)]
    return work


def markdown(shape: Shape, flops_rate: float = H200_BF16_FLOPS, bandwidth: float = H200_BANDWIDTH) -> str:
    """Both memory modes at ``shape``: per-kernel FLOPs, bytes and roofline time, and the totals."""
    lines = [f"## Work of one training step: B = {shape.batch}, C = {shape.num_sampled:,} sampled of "
             f"{shape.num_total:,}, D = {shape.dim}, {8 * shape.operand_bytes}-bit operands", "",
             f"Roofline at {flops_rate / 1e12:.0f} TFLOP/s (bf16, the review's H200 measurement) and "
             f"{bandwidth / 1e12:.1f} TB/s (nominal HBM, not measured): a lower bound, not a measurement. "
             f"6·B·C·D = {6 * shape.batch * shape.num_sampled * shape.dim / 1e12:.2f} TFLOP.", ""]
    for stored in (False, True):
        work = step_work(shape, stored)
        lines += [f"**{'stored (memory_budget ≥ B·C·2 bytes)' if stored else 'lean (memory_budget = 0)'}**", "",
                  "| kernel | GFLOP | GB | roofline ms |", "|---|---|---|---|"]
        for w in work:
            lines.append(f"| {w.name} | {w.flops / 1e9:.0f} | {w.bytes / 1e9:.2f} | "
                         f"{1e3 * w.seconds(flops_rate, bandwidth):.3f} |")
        total = sum(w.seconds(flops_rate, bandwidth) for w in work)
        matmul_flops = sum(w.flops for w in work if "GEMM" in w.name or "lse" in w.name or "softmax_grad" in w.name)
        lines += [f"| **total** | {matmul_flops / 1e9:.0f} (matmul) | {sum(w.bytes for w in work) / 1e9:.2f} | "
                  f"**{1e3 * total:.2f}** |", ""]
    return "\n".join(lines)
