"""Document embedding: synthetic documents, the model, training, evaluation and the registry.

Modules: ``synthetic`` (procedural documents and captures), ``folders`` / ``images`` (image
folders), ``model`` (timm backbone + embedding head), ``distill`` (CLIP teacher), ``training``
(``train.py``'s loop), ``evaluation`` (TPR@FPR, registration accuracy), ``embedders`` (checkpoint
and ONNX inference, export), ``registry`` (register by example, classify with faiss), ``demo``
(synthetic registration folders) and ``cli`` (``fastpfc-doc``).
"""

from .embedders import CheckpointEmbedder, OnnxEmbedder, export_onnx, load_embedder
from .evaluation import OperatingPoint, VerificationReport, registration_accuracy, verification_report
from .registry import Match, Registry

__all__ = ["CheckpointEmbedder", "Match", "OnnxEmbedder", "OperatingPoint", "Registry", "VerificationReport",
           "export_onnx", "load_embedder", "registration_accuracy", "verification_report"]
