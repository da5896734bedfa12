"""fastpfc-doc end to end on a tiny checkpoint and tiny synthetic folders (CPU)."""

import json

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("faiss")

from fastpfc.doc.cli import main  # noqa: E402
from fastpfc.doc.demo import GENERATION_SUB_LABEL, write_demo  # noqa: E402
from fastpfc.doc.embedders import CheckpointEmbedder, export_onnx  # noqa: E402
from fastpfc.doc.training import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(run_dir=str(run), image_size=32, embedding_size=16, train_types=8, per_type=2, eval_types=6,
                      eval_per_type=3, steps=3, batch_size=8, warmup_steps=1, workers=0), progress=False)
    return str(run / "checkpoint.pt")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--quiet", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_register_classify_add_a_type_remove(checkpoint, tmp_path, capsys):
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    assert _run(capsys, "synth", str(demo), "--types", "6", "--captures", "2")[0] == 0
    code, out, _ = _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))
    assert code == 0 and "registered 3 images" in out
    code, out, _ = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--fpr", "0.01", "--labelled",
                        "--json", str(demo / "queries"))
    first = json.loads(out)
    assert code == 0 and len(first["results"]) == 12
    summary = first["summary"]
    assert summary["num_registered_type_queries"] == summary["num_unregistered_type_queries"] == 6
    assert 0 <= summary["type_accuracy"] <= 1 and 0 <= summary["rejection_rate"] <= 1
    assert first["threshold"] == CheckpointEmbedder(checkpoint).operating_points[0.01]

    code, out, _ = _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "new"))  # no retraining
    assert code == 0 and "holds 6 examples of 6 labels" in out
    code, out, _ = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--threshold", "-1", "--json",
                        "--labelled", str(demo / "queries"))
    second = json.loads(out)["summary"]
    assert second["num_unregistered_type_queries"] == 0 and second["num_registered_type_queries"] == 12
    new_type = sorted(p.name for p in (demo / "new").iterdir())[0]
    code, out, _ = _run(capsys, "remove", "-m", checkpoint, "-r", registry, new_type)
    assert code == 0 and "holds 5 examples" in out

    code, out, _ = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--threshold", "0.5", "--top-k", "3",
                        "--json", str(demo / "queries" / new_type / "0.png"))
    nearest = json.loads(out)["results"][0]["nearest"]
    assert code == 0 and len(nearest) == 3 and nearest[0]["score"] >= nearest[1]["score"] >= nearest[2]["score"]
    assert new_type not in {n["type"] for n in nearest}  # removed


def test_export_and_onnx_model_share_the_registry(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    demo, registry, onnx_file = tmp_path / "demo", str(tmp_path / "reg.npz"), str(tmp_path / "model.onnx")
    write_demo(demo, num_types=4, captures=2)
    code, out, _ = _run(capsys, "export", "-m", checkpoint, "-o", onnx_file)
    assert code == 0 and "max |onnxruntime - PyTorch|" in out
    assert _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))[0] == 0
    by_model = {}
    for model in (checkpoint, onnx_file):  # the export has the checkpoint's identity: same registry, same answers
        code, out, _ = _run(capsys, "classify", "-m", model, "-r", registry, "--threshold", "0", "--json",
                            str(demo / "queries"))
        assert code == 0
        by_model[model] = [(r["type"], r["score"]) for r in json.loads(out)["results"]]
    assert [t for t, _ in by_model[checkpoint]] == [t for t, _ in by_model[onnx_file]]
    assert all(abs(a - b) < 1e-3 for (_, a), (_, b) in zip(by_model[checkpoint], by_model[onnx_file], strict=True))
    code, out, _ = _run(capsys, "eval", "-m", onnx_file, str(demo / "queries"))
    assert code == 0 and json.loads(out)["verification"]["num_genuine"] == 4


def test_onnx_export_matches_pytorch_at_any_batch(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fastpfc.doc.embedders import OnnxEmbedder

    embedder = CheckpointEmbedder(checkpoint)
    assert export_onnx(embedder, tmp_path / "m.onnx") < 1e-5
    exported = OnnxEmbedder(tmp_path / "m.onnx")
    for batch in (1, 7):
        images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(exported(images), embedder(images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="opset must be at least 17"):
        export_onnx(embedder, tmp_path / "old.onnx", opset=13)
    real_call = OnnxEmbedder.__call__
    OnnxEmbedder.__call__ = lambda self, images: real_call(self, images) + 1.0  # a broken export
    try:
        with pytest.raises(ValueError, match="differs from the PyTorch model"):
            export_onnx(embedder, tmp_path / "bad.onnx")
    finally:
        OnnxEmbedder.__call__ = real_call
    assert not list(tmp_path.glob("bad.onnx*"))  # nothing written


def test_clear_errors(checkpoint, tmp_path, capsys):
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    write_demo(demo, num_types=2, captures=1)
    code, _, err = _run(capsys, "classify", "-m", checkpoint, "-r", registry, str(demo / "queries"))
    assert code == 2 and "does not exist; create it" in err
    assert _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))[0] == 0
    (demo / "broken.png").write_bytes(b"not an image")
    classify = ["classify", "-m", checkpoint, "-r", registry, "--threshold", "0"]
    code, _, err = _run(capsys, *classify, str(demo / "broken.png"))
    assert code == 2 and "cannot read image" in err and "broken.png" in err
    from PIL import Image
    Image.new("I;16", (8, 8)).save(demo / "deep.png")
    code, _, err = _run(capsys, *classify, str(demo / "deep.png"))
    assert code == 2 and "mode 'I;16'" in err
    code, _, err = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--fpr", "1e-5", str(demo / "queries"))
    assert code == 2 and "no reliable threshold" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "register", "-m", checkpoint, "-r", registry, str(tmp_path / "empty"))
    assert code == 2 and "no images" in err


def test_sub_labels_on_synthetic_variants(checkpoint, tmp_path, capsys):
    """Glare, damaged and generation-2 sub-labels: the separation rates are computed and consistent
    (a right sub-label implies a right parent). README quotes them for the trained default model."""
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    write_demo(demo, num_types=4, captures=2, sub_labels=True)
    assert sorted(p.name for p in next((demo / "register").iterdir()).iterdir() if p.is_dir()) == sorted(
        ["damaged", "glare", GENERATION_SUB_LABEL])
    assert _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))[0] == 0
    code, out, _ = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--threshold", "-1", "--json",
                        "--labelled", str(demo / "queries"))
    summary = json.loads(out)["summary"]
    assert code == 0 and summary["num_registered_type_queries"] == 2 * 2 * 4
    assert summary["sub_label_accuracy"] <= summary["parent_accuracy_of_sub_label_queries"] <= 1
    assert summary["num_unregistered_type_queries"] == 2 * 2 and summary["rejection_rate"] == 0.0  # threshold -1
