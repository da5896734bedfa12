"""The document embedder and its training loop, on tiny synthetic data (CPU)."""

import json

import pytest
import torch

pytest.importorskip("timm")

import fastpfc.doc.ranks as ranks  # noqa: E402
import fastpfc.doc.training as training  # noqa: E402
from fastpfc.doc.baselines import BASELINES  # noqa: E402
from fastpfc.doc.layouts import colour_layout, layout_embedding  # noqa: E402
from fastpfc.doc.model import EMBED_CROPS, DocumentEmbedder, crop_view  # noqa: E402
from fastpfc.doc.training import TrainConfig, train  # noqa: E402


def _config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(run_dir=str(tmp_path), image_size=64, embedding_size=32, head_thumbnail=0, layout_weight=0.0,
                    synthetic="documents",
                    train_types=12, per_type=4, views=1, center_optimizer="adamw", sample_rate=1.0, eval_types=6,
                    eval_per_type=3, real_captures=0, steps=6, batch_size=16, warmup_steps=2, workers=0,
                    checkpoint_every=3, scale=16.0, margin_m=0.2)
    return TrainConfig(**(settings | overrides))


def test_head_layout_and_normalised_output():
    model = DocumentEmbedder(embedding_size=32, image_size=64)
    layers = [type(m).__name__ for m in model.head.layers]
    assert layers == ["Flatten", "Linear", "Sequential", "Linear", "Sequential"]
    assert [type(m).__name__ for m in model.head.layers[2]] == ["LayerNorm", "BatchNorm1d"]
    assert all(m.bias is None for m in model.head.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d))
    model.eval()
    out = model.embed(torch.rand(3, 3, 64, 64))
    assert out.shape == (3, 32) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="unknown head norm"):
        DocumentEmbedder(embedding_size=32, image_size=64, head_norm="gn")


def test_thumbnail_head_sees_the_mean_removed_pooled_input():
    """``head_thumbnail=N``: the head's first Linear takes the squeezed features and the input
    average-pooled to N x N with each image's mean removed (float64 reference on a ragged pool)."""
    model = DocumentEmbedder(embedding_size=16, image_size=64, head_thumbnail=5).double()
    head = model.head
    assert head.layers[1].in_features == 32 * 2 * 2 + 3 * 5 * 5
    features, images = torch.randn(3, head.squeeze.in_channels, 2, 2).double(), torch.rand(3, 3, 64, 64).double()
    seen = {}
    head.layers[1].register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0]))
    head(features, images)
    cells = [((64 * i) // 5, -(-64 * (i + 1) // 5)) for i in range(5)]  # adaptive pooling's overlapping cells
    pooled = torch.stack([torch.stack([images[:, :, top:bottom, left:right].mean(dim=(2, 3)) for left, right in cells],
                                      -1) for top, bottom in cells], -2).flatten(1)
    torch.testing.assert_close(seen["x"][:, -75:], pooled - pooled.mean(dim=1, keepdim=True))
    torch.testing.assert_close(seen["x"][:, :-75], head.squeeze(features).flatten(1))


@pytest.mark.parametrize("layout, size", [("colour", 192), ("lighting_robust", 576), ("lighting_robust_edges", 960),
                                          ("lighting_robust_edges_pyramid", 1740), ("edge_weighted_pyramid", 1740)])
def test_the_layout_is_appended_to_the_embedding(layout, size):
    """``layout_weight=w`` appends the layout times sqrt(w) to the learned unit embedding times
    sqrt(1 - w) in ``embed`` (``forward``, what the loss sees, is the learned embedding alone)."""
    torch.manual_seed(0)
    model = DocumentEmbedder(embedding_size=16, image_size=64, layout_weight=0.36, layout=layout).eval()
    assert (model.learned_size, model.embedding_size) == (16, 16 + size)
    pictures = torch.rand(3, 3, 64, 64)
    out = model.embed(pictures)
    torch.testing.assert_close(out[:, 16:], 0.6 * layout_embedding(pictures, layout))
    torch.testing.assert_close(out[:, :16], 0.8 * torch.nn.functional.normalize(model(pictures), dim=1))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_crop_views_are_the_windows_they_name():
    """On a 64-px picture whose pixels hold their own (row, column), each shifted view is a 58-px
    window (90% of the side) moved 3 px off centre (5% of the side, rounded), resized back: its
    corners hold the window's corners. The full view is the picture itself."""
    coordinates = torch.arange(64, dtype=torch.float64)
    picture = torch.stack(torch.meshgrid(coordinates, coordinates, indexing="ij"))[None]  # [1, 2, 64, 64]
    first_row_and_column = [(3, 0), (3, 6), (0, 3), (6, 3)]  # moved left, right, up, down
    assert crop_view(picture, *EMBED_CROPS["shifted"][0]) is picture
    for view, (top, left) in zip(EMBED_CROPS["shifted"][1:], first_row_and_column, strict=True):
        cropped = crop_view(picture, *view)
        assert cropped.shape == picture.shape
        assert cropped[0, :, 0, 0].tolist() == [top, left]
        assert cropped[0, :, -1, -1].tolist() == [top + 57, left + 57]


def test_shifted_crops_average_the_learned_part_over_five_views():
    """``embed_crops="shifted"``: the learned part is the unit mean of the unit embeddings of the
    picture and its four shifted 58-px windows resized back (float64 reference, windows cut by
    hand); the layout is still the whole picture's."""
    torch.manual_seed(0)
    model = DocumentEmbedder(embedding_size=16, image_size=64, layout_weight=0.36, layout="colour",
                             embed_crops="shifted").eval()
    pictures = torch.rand(3, 3, 64, 64)
    out = model.embed(pictures)
    windows = [pictures[..., 3:61, 0:58], pictures[..., 3:61, 6:64],  # moved left, right
               pictures[..., 0:58, 3:61], pictures[..., 6:64, 3:61]]  # up, down
    views = [pictures] + [torch.nn.functional.interpolate(w, size=(64, 64), mode="bilinear") for w in windows]
    with torch.no_grad():
        units = [torch.nn.functional.normalize(model.double()(v.double()), dim=1) for v in views]
    expected = torch.nn.functional.normalize(sum(units), dim=1)
    torch.testing.assert_close(out[:, :16].double(), 0.8 * expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 16:], 0.6 * layout_embedding(pictures, "colour"))
    assert (out[:, :16].double() - 0.8 * units[0]).norm(dim=1).min() > 0.01  # not the picture alone
    with pytest.raises(ValueError, match="unknown embed_crops 'tiles'; choose one of"):
        DocumentEmbedder(embedding_size=16, image_size=64, embed_crops="tiles")


def test_checkpoints_from_before_the_layout_option_keep_the_colour_layout():
    config = dict(backbone="lcnet_050", embedding_size=16, image_size=64, head_norm="ln+bn", head_thumbnail=8,
                  layout_weight=0.5)  # a config.json written before --layout existed
    model = DocumentEmbedder.from_config(config)
    assert (model.layout, model.embedding_size, model.embed_crops) == ("colour", 16 + 192, "full")
    assert DocumentEmbedder.from_config(config | {"layout": "lighting_robust"}).embedding_size == 16 + 576


def test_colour_layout_undoes_white_balance_and_bad_layouts_are_refused():
    """A white balance (per-channel gains) moves the colour layout of a smooth picture little, a
    thumbnail much; a layout weight of 1 or an unknown layout is a ValueError."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 4, 4), size=(64, 64), mode="bilinear")
    gains = torch.tensor([1.2, 0.9, 0.8]).view(1, 3, 1, 1)
    moved = (colour_layout(smooth * gains) - colour_layout(smooth)).norm(dim=1).max()  # about 0.026
    thumbnail = BASELINES["colour_thumbnail"]
    thumbnail_moved = (thumbnail(smooth * gains) - thumbnail(smooth)).norm(dim=1)
    assert moved < 0.1 < 0.2 < thumbnail_moved.min()  # about 0.4
    with pytest.raises(ValueError, match="layout_weight must be in"):
        DocumentEmbedder(embedding_size=16, image_size=64, layout_weight=1.0)
    with pytest.raises(ValueError, match="unknown layout 'hog'; choose one of"):
        DocumentEmbedder(embedding_size=16, image_size=64, layout_weight=0.5, layout="hog")


def test_training_lowers_the_loss_and_writes_the_run(tmp_path):
    config = _config(tmp_path, steps=40, lr=3e-3, checkpoint_every=100)
    results = train(config, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses
    assert set(results) == {"untrained", "trained", *BASELINES}  # no layout row: --layout-weight 0
    for name in ("config.json", "checkpoint.pt", "eval.json", "loss.png", "roc.png"):
        assert (tmp_path / name).exists(), name


class _InterruptAfter:
    """Stands in for Ctrl-C: asks the loop to stop once ``steps`` steps have run."""

    def __init__(self, steps: int) -> None:
        self.checks, self.steps = 0, steps

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks >= self.steps

    def restore(self) -> None:
        pass


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_interrupt_and_resume_match_an_uninterrupted_run(tmp_path, monkeypatch, sample_rate):
    uninterrupted = _config(tmp_path / "a", sample_rate=sample_rate)
    train(uninterrupted, progress=False)
    resumed = _config(tmp_path / "b", sample_rate=sample_rate)
    monkeypatch.setattr(training, "_StopOnInterrupt", lambda: _InterruptAfter(2))
    with pytest.raises(KeyboardInterrupt, match="step 2 saved"):
        train(resumed, progress=False)
    monkeypatch.undo()
    train(resumed, progress=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["loss"]["weight"], b["loss"]["weight"])
    centers_a, centers_b = a["optimizers"][1]["state"][0], b["optimizers"][1]["state"][0]
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert torch.equal(centers_a[key], centers_b[key]), key
    if sample_rate < 1.0:  # row-sparse: some centers were sampled fewer times than others
        assert centers_a["row_step"].min() < centers_a["row_step"].max() == 6


def test_a_checkpoint_of_the_dense_center_optimizer_is_refused_with_a_reason(tmp_path):
    train(_config(tmp_path, steps=2), progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["optimizer"], state["scheduler"] = state.pop("optimizers")[0], state.pop("schedulers")[0]
    del state["digest"]
    torch.save(state, tmp_path / "checkpoint.pt")  # the layout of earlier versions, which had no digest
    with pytest.raises(ValueError, match="earlier version, which trained the class centers"), \
            pytest.warns(UserWarning, match="has no digest"):
        train(_config(tmp_path, steps=2), progress=False)


def test_resuming_with_other_options_is_refused(tmp_path):
    train(_config(tmp_path, steps=2, lr=4e-3), progress=False)
    config_before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"other options \(--lr 0.004 now 0.001\)"):
        train(_config(tmp_path, steps=4, lr=1e-3), progress=False)
    assert (tmp_path / "config.json").read_text() == config_before  # the record of the run is kept
    with pytest.warns(UserWarning, match="resuming with --steps 3 instead of 2"):
        train(_config(tmp_path, steps=3, lr=4e-3), progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3


def _corrupt_call(monkeypatch, module_class, call: int, corrupt) -> None:
    """Make the ``call``-th call of ``module_class.forward`` return ``corrupt(its result)``."""
    real_forward = module_class.forward
    calls = []

    def forward(self, *args):
        calls.append(1)
        out = real_forward(self, *args)
        return corrupt(out) if len(calls) == call else out

    monkeypatch.setattr(module_class, "forward", forward)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    config = _config(tmp_path)
    _corrupt_call(monkeypatch, training.PartialFCLoss, 5, lambda loss: loss * float("nan"))
    with pytest.raises(FloatingPointError, match="at step 4"):
        train(config, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3


def test_diverged_embeddings_stop_with_the_step_and_keep_the_checkpoint(tmp_path, monkeypatch):
    """Non-finite embeddings (a diverged network) used to stop with the loss's input error; the run
    names the step as for a non-finite loss."""
    config = _config(tmp_path)
    _corrupt_call(monkeypatch, training.Student, 5, lambda out: (out[0] * float("inf"), out[1]))
    with pytest.raises(FloatingPointError, match="embeddings are not finite at step 4"):
        train(config, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3


@pytest.mark.parametrize("centers", [[], ["--synthetic", "mix", "--views", "4", "--center-optimizer", "prototype"]],
                         ids=["default", "prototype"])
def test_torchrun_trains_with_ddp_and_sharded_centers_and_resumes(tmp_path, centers):
    """train.py under torchrun with 2 gloo ranks: each rank holds half the class centers and its own
    checkpoint; a second launch with more steps resumes from them. With prototype centers each rank
    writes the centers of its shard: after 5 steps of 4 classes every one of the 10 has been in a
    batch, so every center of both shards is a unit vector (the initial ones have norm ~0.04)."""
    from pathlib import Path

    from helpers import torchrun

    script = Path(__file__).resolve().parent.parent / "train.py"
    options = ["--run-dir", str(tmp_path), "--image-size", "48", "--embedding-size", "16", "--train-types", "10",
               "--per-type", "4", "--eval-types", "4", "--eval-per-type", "2", "--batch-size", "8",
               "--warmup-steps", "1", "--workers", "0", "--checkpoint-every", "2", "--real-captures", "0", *centers]
    for steps in (3, 5):
        done = torchrun(str(script), *options, "--steps", str(steps))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "TPR@1e-4" in done.stdout and "colour_thumbnail" in done.stdout
        ranks = [torch.load(tmp_path / f"checkpoint-rank{r}.pt", weights_only=False) for r in range(2)]
        assert [r["step"] for r in ranks] == [steps, steps]
        assert [r["loss"]["weight"].shape[0] for r in ranks] == [5, 5]  # 10 classes sharded over 2 ranks
        for key in ranks[0]["model"]:  # DDP keeps the parameters equal (BatchNorm statistics are per rank)
            if "running_" not in key and "num_batches" not in key:
                assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 4, 5]
    if centers:
        norms = torch.cat([r["loss"]["weight"].norm(dim=1) for r in ranks])
        torch.testing.assert_close(norms, torch.ones(10))


def test_under_torchrun_every_rank_takes_the_time_budget_decision(tmp_path):
    """Each rank measures its own pace; they train the fewest steps any of them found (a collective
    at the decision step: a rank that decided alone would leave the others waiting)."""
    from pathlib import Path

    from helpers import torchrun

    script = Path(__file__).resolve().parent.parent / "train.py"
    done = torchrun(str(script), "--run-dir", str(tmp_path), "--image-size", "48", "--embedding-size", "16",
                    "--train-types", "10", "--per-type", "4", "--eval-types", "4", "--eval-per-type", "2",
                    "--batch-size", "8", "--warmup-steps", "2", "--workers", "0", "--real-captures", "0",
                    "--steps", "8", "--time-budget", "0.0001")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 steps would end after" in done.stderr and "training 2 steps" in done.stderr
    ranks = [torch.load(tmp_path / f"checkpoint-rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["step"] for r in ranks] == [2, 2] and [r["plan"]["planned_steps"] for r in ranks] == [2, 2]


def test_recalibrate_batchnorm_sets_the_plain_average_over_the_batches():
    from torch import nn

    from fastpfc.doc.model import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    batches = [torch.randn(5, 4) * (i + 1) + i for i in range(3)]
    assert recalibrate_batchnorm(model, iter(batches)) == 3
    with torch.no_grad():
        features = [model[0](b) for b in batches]
    norm = model[1]
    torch.testing.assert_close(norm.running_mean, torch.stack([f.mean(0) for f in features]).mean(0))
    torch.testing.assert_close(norm.running_var, torch.stack([f.var(0) for f in features]).mean(0))
    assert norm.momentum == 0.1 and not model.training and int(norm.num_batches_tracked) == 3


def test_train_py_help_lists_every_option():
    """``python train.py --help`` prints every TrainConfig field as an option, with its default."""
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "train.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in done.stdout
    words = " ".join(done.stdout.split())  # argparse wraps to the terminal's width
    assert "central 70%" in words and "(default: loose)" in words


@pytest.mark.parametrize("option, value, says", [
    ("checkpoint_every", 0, "--checkpoint-every must be an integer >= 1"), ("batch_size", 0, "--batch-size must be"),
    ("sample_rate", 0.0, r"--sample-rate must be in \(0, 1\]"), ("lr", float("nan"), "--lr must be a finite"),
    ("schedule", "linear", "--schedule must be cosine or poly"), ("steps", -1, "--steps must be"),
    ("views", 3, r"--views \(3\) must divide --per-type \(4\) and --batch-size \(16\)"),
    ("synthetic", "photos", "--synthetic must be one of documents, art_documents, fractals, cards, mix"),
    ("center_optimizer", "lion", "--center-optimizer must be one of adamw, sgd"),
    ("real_captures", 1, "--real-captures must be 0 or an integer >= 2"),
    ("layout_weight", 1.0, r"--layout-weight must be in \[0, 1\)"),
    ("layout", "hog", "--layout must be one of colour, lighting_robust"),
    ("framing", "tight", "--framing must be one of snug, loose"),
    ("time_budget", -2.0, "--time-budget must be -1 or a finite number of minutes >= 0"),
])
def test_bad_options_fail_before_any_work(tmp_path, option, value, says):
    with pytest.raises(ValueError, match=says):
        train(_config(tmp_path / "run", **{option: value}), progress=False)
    assert not (tmp_path / "run").exists()


def test_art_documents_are_the_document_types_with_artwork_and_key_the_teacher_cache(tmp_path):
    from fastpfc.doc.training_data import training_data

    art, art_identity = training_data(_config(tmp_path, synthetic="art_documents"))
    plain, plain_identity = training_data(_config(tmp_path))
    assert [t.type_id for t in art.types] == [t.type_id for t in plain.types]
    assert all("artwork" in t.layout for t in art.types) and not any("artwork" in t.layout for t in plain.types)
    assert art_identity != plain_identity  # a teacher feature cache of one is never taken for the other's
    assert art[(5, 0)][0].shape == (3, 64, 64) and art[(5, 0)][1] == plain[(5, 0)][1] == 1


def test_generated_classes_train_and_eval_json_holds_the_real_image_check_and_baselines(tmp_path):
    """The formula-drawn recipe (four views side by side, prototype centers, thumbnail head,
    layout appended) trains, every embedder, the baselines included, is scored on both
    evaluations, and the checkpoint reloads as the embedder that was evaluated (layout included)."""
    from fastpfc.doc.embedders import CheckpointEmbedder
    from fastpfc.doc.real_images import real_templates

    config = _config(tmp_path, synthetic="mix", train_types=40, per_type=4, views=4, steps=3, real_captures=2,
                     center_optimizer="prototype", head_thumbnail=8, layout_weight=0.5)
    results = train(config, progress=False)
    assert set(results) == {"untrained", "trained", "layout", *BASELINES}
    for name, result in results.items():
        real = result["real_images"]["registration"]
        assert real["num_registered_queries"] == 2 * len(real_templates()) and real["rejection_rate"] is None, name
        assert result["real_images_harsh_light"]["registration"]["num_registered_queries"] == 2 * len(real_templates())
        assert result["verification"]["num_genuine"] == 6 * 3, name  # the synthetic evaluation: 6 types x 3
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["colour_thumbnail"]["real_images"]["registration"] == \
        results["colour_thumbnail"]["real_images"]["registration"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["loss"]["weight"].shape == (40, 32)
    reloaded = CheckpointEmbedder(tmp_path / "checkpoint.pt", device="cpu")
    assert reloaded.dim == 32 + 1740 and reloaded.model_id == saved["trained"]["model_id"]  # the pyramid layout
    assert reloaded(torch.rand(2, 3, 64, 64)).shape == (2, 32 + 1740)


def test_a_run_over_its_time_budget_trains_the_steps_that_fit_exactly_as_a_shorter_run(tmp_path):
    """A budget of a few milliseconds is spent before training: at the end of the warm-up the run
    stops, and it is bit for bit the run started with that many steps. A resume keeps the decision;
    a run within its budget trains every step and stores that it decided so."""
    shortened = _config(tmp_path / "budget", steps=30, warmup_steps=4, time_budget=1e-4)
    with pytest.warns(UserWarning, match=r"30 steps would end after .* over --time-budget 0.0001: training 4 steps"):
        train(shortened, progress=False)
    train(_config(tmp_path / "short", steps=4, warmup_steps=4, time_budget=0), progress=False)
    budget, short = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=False) for run in ("budget", "short"))
    assert budget["step"] == short["step"] == 4 and budget["plan"]["planned_steps"] == 4
    assert budget["plan"]["evaluation_seconds"] > 0
    for key in short["model"]:
        assert torch.equal(budget["model"][key], short["model"][key]), key
    assert torch.equal(budget["loss"]["weight"], short["loss"]["weight"])
    assert budget["schedulers"] == short["schedulers"]
    train(shortened, progress=False)  # resumed: nothing left to train
    assert len((tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()) == 4
    train(_config(tmp_path / "ample", steps=6, time_budget=60.0), progress=False)
    ample = torch.load(tmp_path / "ample" / "checkpoint.pt", weights_only=False)
    assert ample["step"] == ample["plan"]["planned_steps"] == 6


def test_zero_steps_evaluates_and_writes_every_file(tmp_path):
    results = train(_config(tmp_path, steps=0), progress=False)
    assert set(results) == {"untrained", "trained", *BASELINES}
    assert all((tmp_path / name).exists() for name in ("eval.json", "checkpoint.pt", "loss.png", "roc.png"))


def test_on_the_cpu_the_loaders_and_the_steps_share_the_cores_and_the_threads_are_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(ranks, "cores_per_rank", lambda: 5)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ranks.loader_workers(TrainConfig(), cpu) == 4  # the steps take 2 threads: one process more than cores
    assert ranks.loader_workers(TrainConfig(), cuda) == 5
    assert ranks.loader_workers(TrainConfig(workers=4), cpu) == 4
    step_threads, append = [], training.append_metrics
    monkeypatch.setattr(training, "append_metrics",
                        lambda path, record: (step_threads.append(torch.get_num_threads()), append(path, record)))
    before = torch.get_num_threads()
    train(_config(tmp_path, steps=2, workers=1), progress=False)
    assert step_threads == [5, 5]  # 5 cores, one loader
    assert torch.get_num_threads() == before


def test_a_resume_trains_again_what_the_checkpoint_lacks_and_records_each_step_once(tmp_path, monkeypatch):
    """Steps after the last checkpoint are trained again on resume: metrics.jsonl keeps them once,
    and a line cut by the crash is dropped."""
    config = _config(tmp_path)
    _corrupt_call(monkeypatch, training.PartialFCLoss, 5, lambda loss: loss * float("nan"))
    with pytest.raises(FloatingPointError):
        train(config, progress=False)
    monkeypatch.undo()
    metrics = tmp_path / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    metrics.write_text(metrics.read_text() + '{"step": 5, "lo')  # the crash cut a line short
    train(config, progress=False)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, config.steps + 1))


def test_an_unreadable_untrained_evaluation_is_rebuilt_on_resume(tmp_path):
    """A crash can leave eval_untrained.json cut short: the resume evaluates the untrained network
    again (it still has its initial weights before the checkpoint loads), instead of failing at the
    end of the run."""
    train(_config(tmp_path, steps=2), progress=False)
    original = json.loads((tmp_path / "eval_untrained.json").read_text())
    (tmp_path / "eval_untrained.json").write_text('{"model_id": "abc", "verif')
    with pytest.warns(UserWarning, match="evaluating the untrained network again"):
        results = train(_config(tmp_path, steps=2), progress=False)
    assert results["untrained"] == original
    assert json.loads((tmp_path / "eval_untrained.json").read_text()) == original


def test_a_sigkill_mid_run_then_resume_gives_the_uninterrupted_metrics_and_evaluation(tmp_path):
    """train.py killed with SIGKILL after its step-3 checkpoint (a few steps past it), then run again:
    metrics.jsonl holds each step once with the uninterrupted run's losses, and eval.json and the
    final checkpoint's weights are the same."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "train.py"
    options = ["--image-size", "48", "--embedding-size", "16", "--train-types", "10", "--per-type", "4",
               "--eval-types", "4", "--eval-per-type", "2", "--batch-size", "8", "--warmup-steps", "1",
               "--workers", "0", "--checkpoint-every", "3", "--steps", "40", "--sample-rate", "0.5",
               "--real-captures", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(folder: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), "--run-dir", str(folder), *options], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    uninterrupted, killed = tmp_path / "a", tmp_path / "b"
    first = run(killed)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):  # past the step-3 checkpoint
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert (killed / "checkpoint.pt").exists() and not list(killed.glob("*.tmp"))
    for folder in (killed, uninterrupted):
        done = run(folder)
        assert done.wait(timeout=600) == 0, done.stderr.read()

    def losses(folder: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    assert losses(killed) == losses(uninterrupted) and [s for s, _ in losses(killed)] == list(range(1, 41))
    assert json.loads((killed / "eval.json").read_text()) == json.loads((uninterrupted / "eval.json").read_text())
    a, b = (torch.load(f / "checkpoint.pt", weights_only=False) for f in (uninterrupted, killed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_prototype_centers_are_the_unit_mean_of_each_class_in_the_batch():
    """``--center-optimizer prototype``: the batch's classes get the unit mean of their unit
    embeddings (float64 reference), every other center is left bitwise as it was."""
    from fastpfc import PartialFCLoss

    loss_fn = PartialFCLoss(5, 11, seed=3)
    before = loss_fn.weight.detach().clone()
    embeddings = torch.randn(7, 5, generator=torch.Generator().manual_seed(4)) * 3
    labels = torch.tensor([2, 9, 2, 4, 9, 9, 0])
    training.set_prototypes(loss_fn, embeddings, labels, world=1)
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    for c in range(11):
        if c in labels:
            expected = torch.nn.functional.normalize(unit[labels == c].mean(0), dim=0)
            torch.testing.assert_close(loss_fn.weight[c].double(), expected, atol=1e-6, rtol=0)
        else:
            assert torch.equal(loss_fn.weight[c], before[c])


def test_a_frozen_backbone_keeps_its_weights_and_the_head_learns(tmp_path):
    config = _config(tmp_path, steps=2, freeze_backbone=True, checkpoint_every=100)
    torch.manual_seed(config.seed)
    initial = DocumentEmbedder(config.backbone, config.embedding_size, config.image_size, config.head_norm).state_dict()
    train(config, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    weights = [k for k in initial if k.startswith("backbone.") and "running" not in k and "num_batches" not in k]
    assert weights and all(torch.equal(saved[k], initial[k]) for k in weights)
    assert not torch.equal(saved["head.layers.1.weight"], initial["head.layers.1.weight"])
