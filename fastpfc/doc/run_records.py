"""The records a run folder keeps besides its checkpoint: ``metrics.jsonl`` (one line per step,
cut back to the checkpoint on resume), JSON results, and the plots ``loss.png`` and ``roc.png``."""

from __future__ import annotations

import json
from pathlib import Path

from .files import write_text_atomic


def read_json(path: Path) -> dict | None:
    """The content of a JSON file, or ``None`` when it is missing or unreadable (cut by a crash)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; lines cut short by a crash are left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step``, the checkpoint a resume starts from: the steps after it
    are trained (and recorded) again."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(path: Path, record: dict) -> None:
    """One step's record as a line of ``metrics.jsonl``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_run(run: Path, results: dict) -> None:
    """loss.png (the training curve) and roc.png (untrained vs trained), when matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = read_metrics(run / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="loss")
    ax.set(xlabel="step", ylabel="loss", title="training loss and learning rate")
    lr_axis = ax.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", label="learning rate")
    lr_axis.set_ylabel("learning rate (backbone)")
    lines = ax.get_lines() + lr_axis.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="best")
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        tpr_at = result["verification"]["points"][1]["tpr"]
        ax.plot(result["roc"]["fpr"], result["roc"]["tpr"], label=f"{name} (TPR@1e-4 = {tpr_at:.3f})")
    ax.set(xscale="log", xlim=(1e-5, 1), xlabel="FPR", ylabel="TPR", title="ROC, unseen document types")
    ax.legend()
    fig.savefig(run / "roc.png", dpi=100)
    plt.close("all")
