"""Document embedding: synthetic documents, the model, training, evaluation and the registry.

Modules: ``synthetic`` (procedural documents, optionally with artwork, and captures),
``artwork`` (formula-drawn pictures: IFS fractals, dead leaves, gradients), ``procedural``
(formula-driven classes: those pictures and cards drawn from them), ``folders`` / ``images`` (image
folders), ``model`` (timm backbone + embedding head), ``distill`` (CLIP teacher), ``training``
(``train.py``'s loop), ``evaluation`` (TPR@FPR, registration accuracy), ``real_images`` (the
registration check on packaged sample photographs), ``baselines`` (pixels, thumbnail, colour
histogram), ``embedders`` (checkpoint
and ONNX inference, export), ``registry`` (register by example, classify with faiss), ``demo``
(synthetic registration folders) and ``cli`` (``fastpfc-doc``).
"""

from importlib import import_module

from .evaluation import OperatingPoint, VerificationReport, registration_accuracy, verification_report

#: Public names of the modules that need the ``train`` extra (Pillow, timm, faiss), imported on first use.
_LAZY = {"CheckpointEmbedder": "embedders", "OnnxEmbedder": "embedders", "export_onnx": "embedders",
         "load_embedder": "embedders", "Match": "registry", "Registry": "registry"}

__all__ = ["OperatingPoint", "VerificationReport", "registration_accuracy", "verification_report", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
