"""Verification metrics against scikit-learn's ROC and brute force, on generated embeddings."""

import pytest
import torch

from fastpfc.doc import registration_accuracy, verification_report

roc_curve = pytest.importorskip("sklearn.metrics").roc_curve


def _clustered(num_classes: int, per_class: int, dim: int = 16, noise: float = 0.9, seed: int = 0):
    """Unit-norm clusters, rounded to multiples of 1/256: every pair score (a sum of at most 16
    products of such values) is then exact in float32, so the blocked scores, the brute-force ones
    and sklearn's are the same numbers on any machine, whatever the summation order."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = centers[labels] + noise * torch.randn(len(labels), dim, generator=gen)
    return torch.round(torch.nn.functional.normalize(x, dim=1) * 256) / 256, labels


def test_tpr_at_fpr_matches_sklearn_roc():
    x, labels = _clustered(40, 10)
    report = verification_report(x, labels, target_fprs=(1e-4, 1e-3, 1e-2, 0.1), block=64)
    upper = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = (x @ x.T)[upper[0], upper[1]].numpy()
    genuine = (labels[upper[0]] == labels[upper[1]]).numpy()
    assert (report.num_genuine, report.num_impostor) == (int(genuine.sum()), int((~genuine).sum()))
    fpr, tpr, _ = roc_curve(genuine, scores)
    for point in report.points:
        expected = tpr[fpr <= point.target_fpr].max()
        assert point.tpr == pytest.approx(expected, abs=1e-12), point
        assert point.fpr <= point.target_fpr
    assert 0.0 < report.at(1e-3).tpr < report.at(0.1).tpr < 1.0  # a non-trivial, increasing curve


def test_blocks_do_not_change_the_result():
    x, labels = _clustered(25, 6, seed=1)
    whole = verification_report(x, labels, block=10_000)
    blocked = verification_report(x, labels, block=7)
    assert whole.points == blocked.points  # the scores are exact (see _clustered): equal, not close
    assert torch.equal(whole.roc_tpr, blocked.roc_tpr) and torch.equal(whole.roc_fpr, blocked.roc_fpr)


def test_reliability_needs_enough_impostors():
    x, labels = _clustered(40, 10)  # 78,000 impostor pairs
    report = verification_report(x, labels)
    assert [p.reliable for p in report.points] == [False, True, True, True]  # 1e-5 needs 100,000
    assert report.as_dict()["points"][1]["target_fpr"] == 1e-4


def test_roc_curve_is_monotone_and_spans_zero_to_one():
    x, labels = _clustered(30, 5, seed=2)
    report = verification_report(x, labels)
    assert report.roc_fpr[0] == 0 and report.roc_fpr[-1] == 1 and report.roc_tpr[-1] == 1
    assert torch.all(torch.diff(report.roc_fpr) >= 0) and torch.all(torch.diff(report.roc_tpr) >= 0)


def test_no_genuine_pairs_is_an_error():
    with pytest.raises(ValueError, match="need genuine and impostor pairs"):
        verification_report(torch.eye(4), torch.arange(4))


def test_registration_accuracy_against_brute_force():
    x, labels = _clustered(8, 12, seed=3)
    registered = labels < 5
    first = torch.tensor([int((labels == c).nonzero()[0]) for c in range(5)])  # one example per type
    gallery, gallery_labels = x[first], labels[first]
    queries_mask = torch.ones(len(labels), dtype=torch.bool)
    queries_mask[first] = False
    queries, query_labels = x[queries_mask], labels[queries_mask]
    threshold = 0.5
    result = registration_accuracy(gallery, gallery_labels, queries, query_labels, threshold, block=5)
    correct = rejected = 0
    for q, label in zip(queries, query_labels, strict=True):
        scores = [float(q @ g) for g in gallery]
        best = max(range(len(scores)), key=scores.__getitem__)
        accepted = scores[best] > threshold
        if label < 5:
            correct += accepted and int(gallery_labels[best]) == int(label)
        else:
            rejected += not accepted
    num_registered = int(registered[queries_mask].sum())
    assert result["num_registered_queries"] == num_registered
    assert result["accuracy"] == pytest.approx(correct / num_registered)
    assert result["rejection_rate"] == pytest.approx(rejected / (len(query_labels) - num_registered))
    assert 0 < result["accuracy"] < 1 and 0 < result["rejection_rate"] <= 1
