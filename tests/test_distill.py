"""CLIP distillation with a tiny randomly initialised open_clip model (CPU)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

import fastpfc.doc.distill as distill  # noqa: E402
from fastpfc.doc.distill import (  # noqa: E402
    ClipTeacher,
    cosine_distill_loss,
    kl_distill_loss,
    save_random_clip,
    teacher_features,
)
from fastpfc.doc.synthetic import SyntheticDocuments  # noqa: E402
from fastpfc.doc.training import TrainConfig, train  # noqa: E402

TINY = "fastpfc-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """Registers a tiny ViT CLIP config and saves random weights; returns the weights file."""
    vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16}
    return str(save_random_clip(TINY, vision, 24, tmp_path_factory.mktemp("clip"), seed=1))


def test_teacher_gives_unit_features_at_any_input_size(tiny_clip):
    teacher = ClipTeacher(TINY, tiny_clip)
    for size in (40, 64):
        features = teacher(torch.rand(3, 3, size, size))
        assert features.shape == (3, 24) and torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_errors(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipTeacher(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipTeacher("no-such-model", tiny_clip)
    with pytest.raises(ValueError, match="needs --clip-weights"):
        train(TrainConfig(run_dir=str(tmp_path), clip_model=TINY, synthetic="documents", train_types=4, per_type=2,
                          views=1, batch_size=4, image_size=32), progress=False)


def test_feature_cache_is_exact_reused_and_invalidated(tiny_clip, tmp_path, monkeypatch):
    teacher = ClipTeacher(TINY, tiny_clip)
    data = SyntheticDocuments(3, 3, size=48)
    path, identity = tmp_path / "teacher.npy", {"model": TINY, "data": 1}
    cached = teacher_features(teacher, data, path, identity, torch.device("cpu"), batch_size=4, progress=False)
    direct = teacher(torch.stack([data[i][0] for i in range(len(data))]))
    assert isinstance(cached, np.memmap) and cached.shape == (9, 24) and cached.dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(np.array(cached)).float(), direct, atol=2e-3, rtol=0)
    monkeypatch.setattr(distill, "_ImagesOnly", None)  # a rebuild would fail: the cache must answer
    again = teacher_features(teacher, data, path, identity, torch.device("cpu"), progress=False)
    assert np.array_equal(again, cached)
    monkeypatch.undo()
    other = teacher_features(teacher, SyntheticDocuments(2, 2, size=48), path, {"model": TINY, "data": 2},
                             torch.device("cpu"), progress=False)
    assert other.shape == (4, 24)
    small = SyntheticDocuments(2, 2, size=48)
    for damage in (lambda: path.with_suffix(".json").write_text('{"model": '),  # a cut sidecar
                   lambda: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])):  # a cut cache
        damage()
        rebuilt = teacher_features(teacher, small, path, {"model": TINY, "data": 2}, torch.device("cpu"),
                                   progress=False)
        assert np.array_equal(rebuilt, other)  # rebuilt, not an error


def test_distillation_losses():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(64, 24, generator=gen), torch.randn(64, 24, generator=gen)
    assert cosine_distill_loss(teacher * 3, teacher).abs() < 1e-6 and kl_distill_loss(teacher * 3, teacher).abs() < 1e-6
    assert 0.8 < cosine_distill_loss(student, teacher) < 1.2  # unrelated unit vectors: cosine ~ 0
    assert kl_distill_loss(student, teacher) < 0.05  # the recipe's KL is nearly flat (see README)
    expected = (1 - torch.nn.functional.cosine_similarity(student.double(), teacher.double())).mean()
    torch.testing.assert_close(cosine_distill_loss(student, teacher).double(), expected, rtol=1e-6, atol=1e-6)


def test_training_with_distillation_pulls_the_student_to_the_teacher(tiny_clip, tmp_path):
    """The logged teacher cosine (projected student vs teacher, per batch) starts near 0 and ends
    far above it. The setup makes the effect large: over seeds 0, 3 and 6 the last five steps
    averaged 0.70-0.79 against 0.02-0.05 for the first three, so the 0.35 asked for is about half
    of the smallest gain, not a value just under one machine's result."""
    config = TrainConfig(run_dir=str(tmp_path), clip_model=TINY, clip_weights=tiny_clip, image_size=48,
                         embedding_size=16, head_thumbnail=0, synthetic="documents", train_types=8, per_type=4,
                         views=1, center_optimizer="adamw", sample_rate=1.0, eval_types=4, eval_per_type=2,
                         real_captures=0, steps=20,
                         batch_size=16, warmup_steps=2, workers=0, lr=3e-2, scale=16.0, margin_m=0.2,
                         distill_weight=20.0)
    train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    alignment = [r["teacher_cos"] for r in records]
    assert np.mean(alignment[-5:]) > np.mean(alignment[:3]) + 0.35, alignment
    assert all(abs(r["loss"] - r["pfc_loss"] - 20.0 * r["distill_loss"]) < 1e-4 for r in records)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["projection"]["weight"].shape == (24, 16)
    assert (tmp_path / "teacher.npy").exists() and (tmp_path / "teacher.json").exists()
    with pytest.raises(ValueError, match="other options .*--clip-model fastpfc-tiny-clip now None"):
        train(TrainConfig(**(config.__dict__ | {"clip_model": None, "steps": 21})), progress=False)


def _teacher_cache_rank(rank: int, world: int, init_file: str, weights: str, cache: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    open_clip.add_model_config(str(Path(weights).parent / f"{TINY}.json"))
    teacher = ClipTeacher(TINY, weights)
    teacher_features(teacher, SyntheticDocuments(3, 3, size=32), Path(cache), {"model": TINY}, torch.device("cpu"),
                     batch_size=2, progress=False)
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_build_one_cache_together(tiny_clip, tmp_path):
    """Two gloo ranks each compute their share into a part file; rank 0 joins them."""
    cache = tmp_path / "teacher.npy"
    torch.multiprocessing.spawn(_teacher_cache_rank, args=(2, str(tmp_path / "init"), tiny_clip, str(cache)),
                                nprocs=2)
    data = SyntheticDocuments(3, 3, size=32)
    direct = ClipTeacher(TINY, tiny_clip)(torch.stack([data[i][0] for i in range(len(data))]))
    torch.testing.assert_close(torch.from_numpy(np.load(cache)).float(), direct, atol=2e-3, rtol=0)
    assert json.loads(cache.with_suffix(".json").read_text()) == {"model": TINY}
    assert not list(tmp_path.glob("teacher.npy.*"))  # no part or partial files left
