"""benchmarks.compile_report: the kernels compiled for sm_90 on a CPU, and its reading of the SASS."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
needs_tools = pytest.mark.skipif(not (TOOLS / "ptxas").exists(), reason="triton without its CUDA tools")


def test_hot_loop_is_the_largest_loop_holding_another():
    from benchmarks.compile_report import hot_loop

    sass = [(0x00, "MOV R1, R2"), (0x10, "LDG R4, [R2]"),  # 0x10..0x70: the class loop
            (0x20, "FMUL R5, R4, R4"), (0x30, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"),  # 0x20..0x40: K loop
            (0x40, "@P0 BRA 0x20"), (0x50, "MUFU.EX2 R6, R5"), (0x60, "FADD R7, R6, R7"),
            (0x70, "@P1 BRA 0x10"), (0x80, "@P2 BRA 0x90"), (0x90, "EXIT"), (0xa0, "BRA 0xa0")]
    assert hot_loop(sass) == (7, 3)  # 7 instructions from 0x10 to 0x70, 3 of them in the K loop
    # One tile per program: no loop holds another, so the whole kernel is hot and its loop the K loop.
    assert hot_loop(sass[:7]) == (7, 3)
    assert hot_loop(sass[:2]) == (0, 0)  # no loop at all
    # Past the last EXIT: an out-of-line retry loop that branches back into the body is no loop.
    stub = [(0xb0, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR11], R7"), (0xc0, "@!P0 BRA 0xb0"), (0xd0, "BRA 0x50")]
    assert hot_loop(sass[:10] + stub) == (7, 3)


def _compile_in_subprocess(code: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@needs_tools
def test_compiles_the_forward_kernel_for_sm90_without_a_gpu():
    (row,) = _compile_in_subprocess(
        "import json, dataclasses, torch\n"
        "from benchmarks.compile_report import analyse\n"
        "from fastpfc.kernels import TileConfig\n"
        "row = analyse('partial_lse', torch.bfloat16, TileConfig(block_b=64, block_c=64, block_d=32, num_warps=4))\n"
        "print(json.dumps(dataclasses.asdict(row)))\n")
    assert row["wgmma"] == "64x64x16"  # tl.dot on bf16 lowers to Hopper's wgmma at a 64 x 64 tile
    assert 0 < row["registers"] <= 255 and row["spill_stores"] >= 0 and row["spill_loads"] >= 0
    assert row["shared_bytes"] > 0 and row["ctas_per_sm"] >= 1
    assert row["hot_loop_instructions"] > row["k_loop_instructions"] > 0 and row["epilogue_per_element"] > 0


@needs_tools
def test_default_sm90_configs_do_not_spill():
    """Every kernel at the launcher's sm_90 tiles, for every operand dtype: no register spills, and
    bf16/fp16 operands on wgmma at least 128 classes wide."""
    rows = _compile_in_subprocess(
        "import json, dataclasses\n"
        "from benchmarks.compile_report import default_rows\n"
        "for row in default_rows():\n"
        "    print(json.dumps(dataclasses.asdict(row)))\n")
    assert len(rows) == 9
    for row in rows:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
        assert row["wgmma"].startswith("64x128x"), row
