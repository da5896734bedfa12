"""fastpfc-doc end to end on a tiny checkpoint and tiny synthetic folders (CPU)."""

import contextlib
import io
import json
import re
import shutil

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("faiss")

from fastpfc.doc.cli import DEFAULT_VIEWS, main  # noqa: E402
from fastpfc.doc.demo import GENERATION_SUB_LABEL, write_demo  # noqa: E402
from fastpfc.doc.embedders import CheckpointEmbedder, export_onnx  # noqa: E402
from fastpfc.doc.registry import Registry  # noqa: E402
from fastpfc.doc.training import TrainConfig, train  # noqa: E402

from helpers import flipped_copies, load_flipped  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny trained run. Its BatchNorm statistics are recomputed after the last step: the running
    averages of a short run remember weights training has since changed, and in eval mode every
    image then gets nearly the same embedding (median pairwise cosine 0.9998 after these 30 steps,
    -0.43 once recalibrated), which would leave nothing for the tests to tell apart."""
    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(run_dir=str(run), image_size=32, embedding_size=16, synthetic="documents", train_types=8,
                      per_type=2, views=1, center_optimizer="adamw", sample_rate=1.0, eval_types=6, eval_per_type=3,
                      real_captures=0, steps=30, lr=1.5e-2, batch_size=8, warmup_steps=1, workers=0,
                      precise_bn_batches=4), progress=False)
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


@pytest.fixture(scope="module")
def onnx_model(checkpoint, tmp_path_factory) -> str:
    """The checkpoint exported once by ``fastpfc-doc export`` (the export is the slow part)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = str(tmp_path_factory.mktemp("export") / "model.onnx")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["--quiet", "export", "-m", checkpoint, "-o", path])
    difference = re.search(r"max \|onnxruntime - PyTorch\| = (\S+)\)", out.getvalue())
    assert code == 0 and difference and float(difference.group(1)) < 1e-5, out.getvalue()
    return path


#: Both models' embeddings agree to 1e-5 (the onnx_model fixture checks it; 6e-7 measured), and the
#: JSON rounds them to 4 decimals: a top-1 decision is compared only where the gap to the runner-up
#: is wider than this, so that no rounding or float noise can flip it.
DECISIVE_GAP = 5e-4


def test_export_and_onnx_model_share_the_registry(checkpoint, onnx_model, tmp_path, capsys):
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    write_demo(demo, num_types=4, captures=2)
    code, out, _ = _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))
    assert code == 0 and "registered 2 images" in out
    by_model = {}
    for model in (checkpoint, onnx_model):  # the export has the checkpoint's identity: same registry, same answers
        code, out, _ = _run(capsys, "classify", "-m", model, "-r", registry, "--threshold", "0", "--top-k", "2",
                            "--json", str(demo / "queries"))
        assert code == 0
        by_model[model] = json.loads(out)["results"]
    decided = 0
    for ours, exported in zip(by_model[checkpoint], by_model[onnx_model], strict=True):
        assert ours["image"] == exported["image"]
        scores = [{n["example"]: n["score"] for n in row["nearest"]} for row in (ours, exported)]
        assert scores[0].keys() == scores[1].keys()  # both registered examples, scored by both models
        assert all(abs(scores[0][e] - scores[1][e]) < 2e-4 for e in scores[0]), scores
        best, runner_up = ours["nearest"]
        if best["score"] - runner_up["score"] > DECISIVE_GAP:  # the same best match
            assert exported["nearest"][0]["example"] == best["example"], (ours, exported)
            if abs(best["score"]) > DECISIVE_GAP:  # and the same answer at --threshold 0
                assert exported["type"] == ours["type"], (ours, exported)
                decided += 1
    assert decided >= len(by_model[checkpoint]) // 2, f"only {decided} queries had a clear answer"
    code, out, _ = _run(capsys, "eval", "-m", onnx_model, "--json", str(demo / "queries"))
    report = json.loads(out)
    assert code == 0 and set(report) == {"model", "raw_pixels", "colour_thumbnail", "colour_histogram"}
    assert all(result["verification"]["num_genuine"] == 4 for result in report.values())


def test_eval_without_a_folder_runs_the_real_image_check_beside_the_baselines(checkpoint, capsys):
    pytest.importorskip("skimage")
    code, out, _ = _run(capsys, "eval", "-m", checkpoint, "--captures", "2")
    lines = out.splitlines()
    assert code == 0 and "real images" in lines[0] and "top-1" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["model", "layout", "raw_pixels", "colour_thumbnail",
                                                       "colour_histogram"]  # the checkpoint appends a layout
    code, harsh, _ = _run(capsys, "eval", "-m", checkpoint, "--captures", "2", "--harsh-light")
    assert code == 0 and "harsh light" in harsh.splitlines()[0] and harsh.splitlines()[2:] != lines[2:]
    code, _, err = _run(capsys, "eval", "-m", checkpoint, "--harsh-light", "some/folder")
    assert code == 2 and "does not apply to a folder" in err


def test_onnx_export_matches_pytorch_at_any_batch(checkpoint, onnx_model, tmp_path, monkeypatch):
    from fastpfc.doc.embedders import OnnxEmbedder

    embedder, exported = CheckpointEmbedder(checkpoint), OnnxEmbedder(onnx_model)
    assert exported.model_id == embedder.model_id
    for batch in (1, 7):
        images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(exported(images), embedder(images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="opset must be at least 17"):
        export_onnx(embedder, tmp_path / "old.onnx", opset=13)
    # A broken export is refused and nothing is written. Exporting again would only repeat the
    # fixture's work: the "export" copies the good file, and onnxruntime's answers are made wrong.
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, path, **kwargs: shutil.copy(onnx_model, path))
    real_call = OnnxEmbedder.__call__
    monkeypatch.setattr(OnnxEmbedder, "__call__", lambda self, images: real_call(self, images) + 1.0)
    with pytest.raises(ValueError, match="differs from the PyTorch model"):
        export_onnx(embedder, tmp_path / "bad.onnx")
    assert not list(tmp_path.glob("bad.onnx*"))


def test_clear_errors(checkpoint, tmp_path, capsys):
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    write_demo(demo, num_types=2, captures=1)
    code, _, err = _run(capsys, "classify", "-m", checkpoint, "-r", registry, str(demo / "queries"))
    assert code == 2 and "does not exist; create it" in err
    assert _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))[0] == 0
    assert Registry.load(registry, CheckpointEmbedder(checkpoint)).views == DEFAULT_VIEWS == 8
    code, _, err = _run(capsys, "register", "-m", checkpoint, "-r", registry, "--views", "0", str(demo / "register"))
    assert code == 2 and "registers 8 views per image, not 0" in err
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
    assert sorted(p.name for p in sorted((demo / "register").iterdir())[0].iterdir() if p.is_dir()) == sorted(
        ["damaged", "glare", GENERATION_SUB_LABEL])
    assert _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))[0] == 0
    code, out, _ = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--threshold", "-1", "--json",
                        "--labelled", str(demo / "queries"))
    summary = json.loads(out)["summary"]
    assert code == 0 and summary["num_registered_type_queries"] == 2 * 2 * 4
    assert summary["sub_label_accuracy"] <= summary["parent_accuracy_of_sub_label_queries"] <= 1
    assert summary["num_unregistered_type_queries"] == 2 * 2 and summary["rejection_rate"] == 0.0  # threshold -1


def test_register_refuses_a_folder_one_level_too_high(checkpoint, tmp_path, capsys):
    """demo/ holds register/, new/ and queries/: given as the folder, its sub-folders would become
    three types with every real type a sub-label. Refused with a reason; --force registers it."""
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    assert _run(capsys, "synth", str(demo), "--types", "20", "--captures", "1")[0] == 0
    code, out, err = _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo))
    assert code == 2 and "folder of folders of types" in err and "new, queries, register" in err
    assert not (tmp_path / "reg.npz").exists()
    code, out, _ = _run(capsys, "register", "-m", checkpoint, "-r", registry, "--force", str(demo))
    assert code == 0 and "holds 40 examples of 40 labels" in out  # 10 + 10 + 20 <type>/<sub-label> labels
    code, out, _ = _run(capsys, "register", "-m", checkpoint, "-r", str(tmp_path / "two.npz"),
                        str(demo / "register"))
    assert code == 0 and out.startswith("registering 10 images of 10 labels: ")


def test_classify_shows_the_best_match_of_rejected_images_and_only_measured_rates(checkpoint, tmp_path, capsys):
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    assert _run(capsys, "synth", str(demo), "--types", "4", "--captures", "1")[0] == 0
    assert _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))[0] == 0
    registered = sorted(p.name for p in (demo / "register").iterdir())
    code, out, _ = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--threshold", "1.0",
                        str(demo / "queries"))
    rows = out.splitlines()
    assert code == 0 and len(rows) == 4
    for row in rows:  # everything is rejected at threshold 1, and each row still names its best match
        best = re.search(r"unknown\s+([-0-9.]+)  \(best: (\S+)\)", row)
        assert best and best.group(2) in registered, row
    code, out, _ = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--threshold", "-1", "--labelled",
                        str(demo / "register"))
    assert code == 0 and "type_accuracy: 1.000" in out
    assert "None" not in out and "rejection_rate" not in out and "sub_label_accuracy:" not in out


def test_a_nan_threshold_is_refused(checkpoint, tmp_path, capsys):
    """NaN compares false with every score, so it used to accept every query as known."""
    demo, registry = tmp_path / "demo", str(tmp_path / "reg.npz")
    assert _run(capsys, "synth", str(demo), "--types", "2", "--captures", "1")[0] == 0
    assert _run(capsys, "register", "-m", checkpoint, "-r", registry, str(demo / "register"))[0] == 0
    for option in (["--threshold", "nan"], ["--threshold", "0.5", "--sub-threshold", "nan"]):
        code, out, err = _run(capsys, "classify", "-m", checkpoint, "-r", registry, "--json", *option,
                              str(demo / "queries"))
        assert code == 2 and "must be a finite score" in err and out == ""


def test_no_changed_byte_of_an_onnx_export_runs_silently(onnx_model, tmp_path):
    """Single-bit changes at 20 seeded places of an export: each copy is refused (damaged, or not a
    valid model), or gives exactly the original embeddings (a byte the format ignores)."""
    from fastpfc.doc.embedders import OnnxEmbedder

    original = open(onnx_model, "rb").read()
    reference = OnnxEmbedder(onnx_model)
    images = torch.rand(2, 3, reference.image_size, reference.image_size, generator=torch.Generator().manual_seed(0))
    expected = reference(images)
    refused = 0
    for position, embedder in load_flipped(original, tmp_path, ".onnx", OnnxEmbedder, ValueError, 20, seed=6):
        refused += embedder is None
        if embedder is not None:
            assert torch.equal(embedder(images), expected), f"byte {position} changed the embeddings silently"
            assert embedder.model_id == reference.model_id
    assert refused >= 15


def test_damaged_registries_and_eval_files_get_one_line_naming_the_file(checkpoint, tmp_path, capsys):
    """A registry with a changed byte (10 seeded places), cut in half, or of other content, and an
    eval.json beside the checkpoint that is cut, null or of another shape: each either gives the
    clean answer or exit status 2 with one line that names the file (no traceback)."""
    demo, registry = tmp_path / "demo", tmp_path / "reg.npz"
    write_demo(demo, num_types=2, captures=1)
    assert _run(capsys, "register", "-m", checkpoint, "-r", str(registry), str(demo / "register"))[0] == 0
    classify = ["classify", "-m", checkpoint, "--threshold", "0.5", str(demo / "queries")]
    clean = _run(capsys, *classify, "-r", str(registry))
    original = registry.read_bytes()
    damaged = [original[: len(original) // 2], b"not a registry" * 8]
    damaged += [copy for _, copy in flipped_copies(original, 10, seed=7)]
    bad = tmp_path / "bad.npz"
    for content in damaged:
        bad.write_bytes(content)
        code, out, err = _run(capsys, *classify, "-r", str(bad))
        assert (code, out) == clean[:2] or (code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1), err
    copied = tmp_path / "run" / "checkpoint.pt"
    copied.parent.mkdir()
    shutil.copy(checkpoint, copied)
    for content in ['{"trained": {', "null", '{"x": 1}', "\x00\x01"]:
        (copied.parent / "eval.json").write_text(content)
        code, _, err = _run(capsys, "classify", "-m", str(copied), "-r", str(registry), str(demo / "queries"))
        assert code == 2 and "eval.json (beside the checkpoint) is damaged" in err and str(copied.parent) in err, err
