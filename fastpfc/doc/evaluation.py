"""Verification metrics of an embedding: TPR at fixed FPR over all pairs, and registration accuracy.

Convention. A pair is accepted when its cosine score is strictly above the threshold. For a target
FPR ``f`` over ``n`` impostor pairs, at most ``m = floor(f * n)`` impostors may be accepted; the
threshold is the ``(m + 1)``-th largest impostor score (the lowest threshold that accepts no more
than ``m``), and the TPR is the share of genuine pairs above it. This is the largest TPR among the
ROC points whose FPR is at most ``f`` (what ``sklearn.metrics.roc_curve`` gives). A point is marked
``reliable`` only when there are at least ``1 / f`` impostor pairs; with fewer, a TPR at that FPR
is not measurable and must not be quoted.

Scale. Pairs are scored in row blocks, so no [N, N] matrix is built. Genuine scores are kept (few);
of the impostor scores only the largest ``floor(max_fpr * n) + 1`` (exact for every target FPR) and
a histogram (for the ROC curve) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Histogram bins over [-1, 1] for the ROC curve (the operating points are exact, not binned).
ROC_BINS = 4000
DEFAULT_FPRS = (1e-5, 1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class OperatingPoint:
    target_fpr: float
    threshold: float
    tpr: float
    fpr: float  # achieved, <= target_fpr
    reliable: bool  # at least 1 / target_fpr impostor pairs


@dataclass
class VerificationReport:
    points: list[OperatingPoint]
    num_genuine: int
    num_impostor: int
    roc_fpr: torch.Tensor = field(repr=False)  # [ROC_BINS + 1], decreasing thresholds
    roc_tpr: torch.Tensor = field(repr=False)

    def at(self, target_fpr: float) -> OperatingPoint:
        return next(p for p in self.points if p.target_fpr == target_fpr)

    def as_dict(self) -> dict:
        return {"num_genuine": self.num_genuine, "num_impostor": self.num_impostor,
                "points": [p.__dict__ for p in self.points]}


def _pair_blocks(embeddings: torch.Tensor, labels: torch.Tensor, block: int):
    """Yield (scores, same_label) of the pairs (i, j), i < j, one block of rows i at a time."""
    n = embeddings.shape[0]
    columns = torch.arange(n, device=embeddings.device)
    for start in range(0, n, block):
        rows = torch.arange(start, min(start + block, n), device=embeddings.device)
        upper = columns[None, :] > rows[:, None]
        scores = embeddings[rows] @ embeddings.T
        yield scores[upper], (labels[rows][:, None] == labels[None, :])[upper]


def verification_report(
    embeddings: torch.Tensor, labels: torch.Tensor, target_fprs: tuple[float, ...] = DEFAULT_FPRS,
    block: int = 1024,
) -> VerificationReport:
    """TPR at each target FPR over all pairs of ``embeddings`` [N, D] (L2-normalised) with ``labels`` [N].

    Raises ``ValueError`` when there is no genuine or no impostor pair.
    """
    embeddings = embeddings.float()
    n = embeddings.shape[0]
    counts = torch.bincount(labels)
    num_genuine = int((counts * (counts - 1) // 2).sum())
    num_impostor = n * (n - 1) // 2 - num_genuine
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"need genuine and impostor pairs, got {num_genuine} and {num_impostor}")
    keep = min(num_impostor, int(max(target_fprs) * num_impostor) + 1)
    top_impostor = embeddings.new_empty(0)
    genuine, histogram = [], torch.zeros(ROC_BINS, dtype=torch.int64, device=embeddings.device)
    for scores, same in _pair_blocks(embeddings, labels, block):
        genuine.append(scores[same])
        impostor = scores[~same]
        histogram += torch.histc(impostor.clamp(-1.0, 1.0), bins=ROC_BINS, min=-1.0, max=1.0).long()
        top_impostor = torch.topk(torch.cat([top_impostor, impostor]), min(keep, top_impostor.numel()
                                                                           + impostor.numel())).values
    genuine_sorted = torch.sort(torch.cat(genuine)).values
    points = []
    for target in target_fprs:
        allowed = int(target * num_impostor)
        threshold = float(top_impostor[min(allowed, top_impostor.numel() - 1)])
        accepted_impostors = int((top_impostor > threshold).sum())
        accepted_genuine = num_genuine - int(torch.searchsorted(genuine_sorted, threshold, right=True))
        points.append(OperatingPoint(target, threshold, accepted_genuine / num_genuine,
                                     accepted_impostors / num_impostor, num_impostor * target >= 1.0))
    # ROC from the histogram: thresholds at the bin edges, from high to low.
    edges = torch.linspace(-1.0, 1.0, ROC_BINS + 1, device=embeddings.device)
    false_accepts = torch.cat([histogram.flip(0).cumsum(0).flip(0), histogram.new_zeros(1)])
    true_accepts = num_genuine - torch.searchsorted(genuine_sorted, edges, right=True)
    return VerificationReport(points, num_genuine, num_impostor,
                              roc_fpr=(false_accepts / num_impostor).flip(0).cpu(),
                              roc_tpr=(true_accepts / num_genuine).flip(0).cpu())


def registration_accuracy(
    gallery: torch.Tensor, gallery_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
    threshold: float, block: int = 1024,
) -> dict[str, float]:
    """Classify each query by its nearest registered example, rejecting it at or below ``threshold``.

    Args:
        gallery: [G, D] L2-normalised embeddings of the registered examples, labels [G].
        queries: [Q, D] L2-normalised embeddings of captures, labels [Q]; queries whose label is
            not registered must be rejected.

    Returns:
        ``accuracy``: share of registered-type queries whose nearest example has their label and
        scores above the threshold; ``top1``: share whose nearest example has their label, whatever
        its score; ``rejection_rate``: share of unregistered-type queries rejected (``None``
        without such queries); and the two counts.
    """
    best_scores, best_labels = [], []
    for start in range(0, queries.shape[0], block):
        scores = queries[start:start + block].float() @ gallery.float().T
        value, position = scores.max(dim=1)
        best_scores.append(value)
        best_labels.append(gallery_labels[position])
    best_score, best_label = torch.cat(best_scores), torch.cat(best_labels)
    registered = torch.isin(query_labels, gallery_labels)
    accepted = best_score > threshold
    nearest_right = best_label == query_labels
    correct = accepted & nearest_right
    return {
        "accuracy": float(correct[registered].float().mean()) if registered.any() else None,
        "top1": float(nearest_right[registered].float().mean()) if registered.any() else None,
        "rejection_rate": float((~accepted[~registered]).float().mean()) if (~registered).any() else None,
        "num_registered_queries": int(registered.sum()),
        "num_unregistered_queries": int((~registered).sum()),
    }


def registration_split(queries) -> tuple:
    """(queries, gallery, registered classes) of a labelled dataset: the first image of each of the
    first half of the classes is registered (and is not a registration query itself, see
    :func:`evaluate_embedders`); the other half of the classes must be rejected."""
    first = {}
    for item, label in enumerate(queries.labels):
        first.setdefault(label, item)
    registered = sorted(first)[:len(first) // 2]
    return queries, torch.utils.data.Subset(queries, [first[c] for c in registered]), registered


def evaluate_embedders(embedders: dict, queries, gallery, registered: list[int], batch_size: int = 128) -> dict:
    """Verification report over all pairs of ``queries`` and registration accuracy of them against
    ``gallery`` (the examples of the ``registered`` classes) at the FPR=1e-4 threshold, for each
    of ``embedders`` (name -> embed); every image is loaded once for all of them.

    An embed maps images [B, 3, S, S] to unit embeddings [B, D] (pairs are scored on their
    device); the datasets give (image, label). When ``gallery`` is a ``Subset`` of ``queries``, its
    images are left out of the registration queries (each would find itself). Returns, by name, a
    JSON-ready dict: ``verification``, ``registration`` (with its ``threshold``), ``roc``.
    """
    def embed_all(dataset) -> dict[str, torch.Tensor]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        parts = {name: [] for name in embedders}
        for images, _ in loader:
            for name, embed in embedders.items():
                parts[name].append(embed(images).float())
        return {name: torch.cat(rows) for name, rows in parts.items()}

    query_embeddings, gallery_embeddings = embed_all(queries), embed_all(gallery)
    all_labels, gallery_labels = torch.tensor(queries.labels), torch.tensor(registered)
    keep = torch.ones(len(all_labels), dtype=torch.bool)
    if isinstance(gallery, torch.utils.data.Subset) and gallery.dataset is queries:
        keep[list(gallery.indices)] = False
    results = {}
    for name, embeddings in query_embeddings.items():  # each on its embedder's device
        device = embeddings.device
        labels, kept = all_labels.to(device), keep.to(device)
        report = verification_report(embeddings, labels)
        threshold = report.at(1e-4).threshold
        registration = registration_accuracy(gallery_embeddings[name].to(device), gallery_labels.to(device),
                                             embeddings[kept], labels[kept], threshold)
        results[name] = {"verification": report.as_dict(), "registration": {**registration, "threshold": threshold},
                         "roc": {"fpr": report.roc_fpr.tolist(), "tpr": report.roc_tpr.tolist()}}
    return results


def evaluate_embedder(embed, queries, gallery, registered: list[int], batch_size: int = 128) -> dict:
    """:func:`evaluate_embedders` of the one embedder ``embed``."""
    return evaluate_embedders({"model": embed}, queries, gallery, registered, batch_size)["model"]


#: Further sets a result may hold, by key, with their title in :func:`summary_table`.
EXTRA_SETS = {"real_images": "real images", "real_images_harsh_light": "real, harsh light"}


def summary_table(results: dict[str, dict], first: str = "unseen synthetic") -> str:
    """A text table of :func:`evaluate_embedders`-style results (name -> result, each optionally
    with results of :data:`EXTRA_SETS` under their keys): TPR at FPR 1e-4 and 1e-3, registration
    accuracy (at the 1e-4 threshold) and top-1, a block per set. A TPR whose FPR is not measurable
    on this many pairs is shown as ``n/a``."""
    def cells(result: dict) -> list[str]:
        points = {p["target_fpr"]: p for p in result["verification"]["points"]}
        registration = result["registration"]
        return [f"{points[f]['tpr']:.3f}" if points[f]["reliable"] else "n/a" for f in (1e-4, 1e-3)] + [
            "-" if registration[k] is None else f"{registration[k]:.3f}" for k in ("accuracy", "top1")]

    columns = ["TPR@1e-4", "TPR@1e-3", "register", "top-1"]
    extra = [key for key in EXTRA_SETS if any(key in r for r in results.values())]
    sets = [first] + [EXTRA_SETS[key] for key in extra]
    width = max(len(name) for name in results) + 2
    lines = [" " * width + "".join(f"| {s:<{9 * len(columns) + 1}}" for s in sets),
             " " * width + ("| " + "".join(f"{c:>9}" for c in columns) + " ") * len(sets)]
    for name, result in results.items():
        row = cells(result) + [cell for key in extra if key in result for cell in cells(result[key])]
        lines.append(f"{name:<{width}}" + "".join("| " + "".join(f"{c:>9}" for c in row[i:i + 4]) + " "
                                                for i in range(0, len(row), 4)))
    return "\n".join(lines)
