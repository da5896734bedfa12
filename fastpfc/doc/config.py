"""What a ``train.py`` run is: :class:`TrainConfig` (every field a command-line option), the
check that refuses a bad value before any work, and the registry of ``--center-optimizer`` choices."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastpfc.optim import SparseAdamW, SparseSGD

from .layouts import LAYOUTS
from .model import EMBED_CROPS
from .procedural import SOURCES
from .synthetic import DOCUMENT_SOURCES, FRAMINGS

#: ``--center-optimizer`` choices: row-sparse optimizers of the class centers, without weight
#: decay, or ``prototype`` (no optimizer; see :func:`set_prototypes`).
CENTER_OPTIMIZERS = {
    "adamw": lambda params, lr: SparseAdamW(params, lr=lr, weight_decay=0.0),
    "sgd": lambda params, lr: SparseSGD(params, lr=lr, momentum=0.9),
    "prototype": None,
}



def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run needs; ``train.py`` turns each field into a command-line option."""

    run_dir: str = _option("runs/default", "run folder: config, checkpoint, metrics, eval, plots")
    backbone: str = _option("mobilenetv3_small_050", "timm backbone name")
    weights: str | None = _option(None, "local file of pretrained backbone weights (nothing is downloaded)")
    embedding_size: int = _option(256, "learned embedding dimension (--layout-weight appends the layout's fixed ones: "
                                        "1740 for the default --layout)")
    image_size: int = _option(128, "input images are image_size x image_size")
    head_norm: str = _option("ln+bn", "norms after the head's linear layers: ln+bn, ln or bn")
    head_thumbnail: int = _option(8, "the head also sees the input average-pooled to N x N (colour layout); 0: off")
    layout_weight: float = _option(0.5, "share of the embedding's cosine given to a fixed layout of the image's "
                                        "central 70% in cells (--layout), appended to the learned embedding "
                                        "after training; 0: the learned embedding alone")
    layout: str = _option("edge_weighted_pyramid",
                          "the fixed layout: colour (each channel over its mean, 8 x 8 cells), lighting_robust "
                          "(that, a chromaticity layout and a shading-free log layout, a third each), "
                          "lighting_robust_edges (those for half of the cosine, oriented edges for the other half), "
                          "lighting_robust_edges_pyramid (that at 4 x 4, 6 x 6 and 8 x 8 cells, a third each) "
                          "or edge_weighted_pyramid (that with the edges at two thirds of the cosine)")
    embed_crops: str = _option("shifted", "views of an image whose learned embeddings the embedding averages: full "
                                          "(the image alone) or shifted (the image and four crops of 90% of its "
                                          "side moved 5% up, down, left and right; five network passes per image)")
    data: str | None = _option(None, "folder of training images (default: the built-in synthetic images, see "
                                     "--synthetic)")
    data_layout: str = _option("per_image", "--data layout: per_image (each image a class) or subfolders")
    eval_data: str | None = _option(None, "folder of class sub-folders to evaluate on (default: unseen synthetic "
                                           "types)")
    synthetic: str = _option("documents", "built-in training images: documents (templates whose fields vary), "
                                    "art_documents (the same with formula-drawn artwork), fractals (IFS fractals and "
                                    "dead leaves), cards (cards drawn from those) or mix (all but art_documents)")
    train_types: int = _option(400, "synthetic classes to train on (document types, or generated images)")
    per_type: int = _option(64, "synthetic training items per class (documents of a type, or views of an image); "
                                "the CLIP teacher cache holds one row per item")
    framing: str = _option("loose", "how the training captures frame the image: loose (tight or loose, off-centre, "
                                    "as by hand) or snug (filling the frame, as the synthetic evaluation's captures)")
    clean_views: int = _option(0, "of each class's --views, how many are the clean image (as registered) instead "
                                  "of a camera capture (generated sources)")
    views: int = _option(1, "items of one synthetic class side by side in a batch (divides --per-type and "
                            "--batch-size; 1: every item drawn on its own)")
    eval_types: int = _option(100, "unseen synthetic types to evaluate on")
    eval_per_type: int = _option(8, "captures per evaluation type")
    real_captures: int = _option(8, "photographs per template of the real-image checks, plain and under harsh "
                                    "light (sample images shipped by scikit-image and matplotlib); 0 skips them")
    steps: int = _option(800, "optimizer steps (at most; see --time-budget)")
    time_budget: float = _option(-1.0, "minutes the run may take, its evaluations included: at the end of the warm-up "
                                       "(step 40 at the latest) it measures its pace and, if --steps would go over, "
                                       "trains the steps that fit (a multiple of 10; kept on resume). -1: 9 minutes "
                                       "when --steps is left at its default, no limit when --steps is given; 0: no "
                                       "limit")
    batch_size: int = _option(64, "images per step")
    lr: float = _option(6e-3, "peak learning rate of the backbone and head")
    freeze_backbone: bool = _option(False, "keep the backbone's initial weights (train the head only)")
    center_optimizer: str = _option("adamw", "how the class centers learn: adamw or sgd (momentum 0.9), row-sparse "
                                             "(only the sampled centers move), or prototype (each batch sets its "
                                             "classes' centers to the mean of their embeddings: a memory bank)")
    center_lr: float = _option(2e-2, "peak learning rate of the class centers")
    weight_decay: float = _option(0.05, "AdamW weight decay of the backbone and head")
    warmup_steps: int = _option(50, "linear warm-up steps")
    schedule: str = _option("cosine", "decay after warm-up: cosine or poly")
    margin: str = _option("cosface", "margin: cosface, arcface, combined or softmax")
    scale: float = _option(32.0, "margin scale s (the ImageNet-scale recipe uses 64)")
    margin_m: float = _option(0.25, "margin m (the ImageNet-scale recipe uses 0.4)")
    sample_rate: float = _option(1.0, "PartialFC sample rate of the class centers")
    clip_grad: float = _option(5.0, "gradient norm clip of the backbone and head")
    clip_model: str | None = _option(None, "open_clip model to distil from, e.g. ViT-B-32 (needs --clip-weights)")
    clip_weights: str | None = _option(None, "local file of the open_clip model's weights")
    teacher_cache: str | None = _option(None, "memory-mapped teacher features (default: <run-dir>/teacher.npy); "
                                              "reused by runs with the same teacher and data")
    distill_loss: str = _option("cosine", "distillation loss: cosine or kl (the recipe's, nearly flat)")
    distill_weight: float = _option(1.0, "weight of the distillation loss next to the PartialFC loss")
    channels_last: bool = _option(True, "channels_last memory format for the network and its input (on the 2-core "
                                        "CPU 11% more images/s, five pairs of runs; --no-channels-last: off)")
    compile: bool = _option(False, "torch.compile the network")
    workers: int = _option(-1, "DataLoader worker processes per rank (-1: this rank's share of the CPU cores, at "
                               "most 8, when a GPU trains; when the CPU trains, the cores the steps' threads (half) "
                               "leave, plus one)")
    checkpoint_every: int = _option(200, "steps between checkpoints")
    seed: int = _option(0, "seed of the data, the model and the sampling")
    backend: str = _option("auto", "PartialFC backend: auto, triton or torch")
    precise_bn_batches: int = _option(0, "after the last step, recompute the BatchNorm statistics over this many "
                                         "training batches (0: keep the running averages; helps short runs)")


#: Option -> (test, what it must be): checked before any work, so that a bad value fails at once
#: rather than after an evaluation or at the end of a run.
_OPTION_RULES = {
    "steps": (lambda v: v >= 0, "an integer >= 0"),
    "time_budget": (lambda v: v == -1 or (math.isfinite(v) and v >= 0), "-1 or a finite number of minutes >= 0"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "checkpoint_every": (lambda v: v >= 1, "an integer >= 1"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "embedding_size": (lambda v: v >= 1, "an integer >= 1"),
    "image_size": (lambda v: v >= 16, "an integer >= 16"),
    "head_thumbnail": (lambda v: v >= 0, "an integer >= 0"),
    "layout_weight": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "layout": (lambda v: v in LAYOUTS, f"one of {', '.join(LAYOUTS)}"),
    "embed_crops": (lambda v: v in EMBED_CROPS, f"one of {', '.join(EMBED_CROPS)}"),
    "train_types": (lambda v: v >= 1, "an integer >= 1"),
    "per_type": (lambda v: v >= 1, "an integer >= 1"),
    "views": (lambda v: v >= 1, "an integer >= 1"),
    "clean_views": (lambda v: v >= 0, "an integer >= 0"),
    "synthetic": (lambda v: v in (*DOCUMENT_SOURCES, *SOURCES), f"one of {', '.join((*DOCUMENT_SOURCES, *SOURCES))}"),
    "framing": (lambda v: v in FRAMINGS, f"one of {', '.join(FRAMINGS)}"),
    "eval_types": (lambda v: v >= 2, "an integer >= 2"),
    "eval_per_type": (lambda v: v >= 2, "an integer >= 2 (pairs of the same type are needed)"),
    "real_captures": (lambda v: v == 0 or v >= 2, "0 or an integer >= 2 (pairs of the same template are needed)"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "center_lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "center_optimizer": (lambda v: v in CENTER_OPTIMIZERS, f"one of {', '.join(CENTER_OPTIMIZERS)}"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "clip_grad": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "sample_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "distill_weight": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "schedule": (lambda v: v in ("cosine", "poly"), "cosine or poly"),
    "precise_bn_batches": (lambda v: v >= 0, "an integer >= 0"),
}


def check_config(config: TrainConfig) -> None:
    """Raise a ValueError naming the first option whose value cannot work."""
    for name, (valid, expected) in _OPTION_RULES.items():
        value = getattr(config, name)
        if not valid(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value!r}")
    if config.data is None and (config.per_type % config.views or config.batch_size % config.views):
        raise ValueError(f"--views ({config.views}) must divide --per-type ({config.per_type}) and --batch-size "
                         f"({config.batch_size})")
