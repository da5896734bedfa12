"""Document embedding: evaluation (and, to come, data, model, training and the registry)."""

from .evaluation import OperatingPoint, VerificationReport, registration_accuracy, verification_report

__all__ = ["OperatingPoint", "VerificationReport", "registration_accuracy", "verification_report"]
