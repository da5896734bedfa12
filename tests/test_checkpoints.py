"""Checkpoints are read with weights_only=True: a payload is refused, wrong kinds of files are named,
and every fastpfc-doc subcommand answers a wrong file with one line and exit status 2."""

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastpfc.doc.checkpoints import CheckpointError, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastpfc.doc.cli import main
from fastpfc.doc.embedders import CheckpointEmbedder
from fastpfc.doc.files import atomic_output, content_digest
from fastpfc.doc.model import DocumentEmbedder

from helpers import load_flipped


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a crafted checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real (untrained, tiny) checkpoint and files of every wrong kind."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = DocumentEmbedder("lcnet_050", 16, 32, "ln+bn")
    config = {"backbone": "lcnet_050", "embedding_size": 16, "image_size": 32, "head_norm": "ln+bn"}
    good = root / "checkpoint.pt"
    save_checkpoint(good, {"model": model.state_dict(), "config": config})
    paths = {"good": good}
    paths["payload"] = root / "payload.pt"
    torch.save({"model": model.state_dict(), "config": config, "extra": _Payload(str(root / "pwned"))},
               paths["payload"])
    paths["text"] = root / "metrics.jsonl"
    paths["text"].write_text('{"step": 1, "loss": 3.2}\n')
    paths["npz"] = root / "registry.npz"
    np.savez(paths["npz"], features=np.zeros((2, 3), np.float32))
    paths["onnx"] = root / "model.onnx"
    paths["onnx"].write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(range(40)))
    paths["empty"] = root / "empty.pt"
    paths["empty"].write_bytes(b"")
    paths["truncated"] = root / "truncated.pt"
    paths["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    paths["folder"] = root / "folder"
    paths["folder"].mkdir()
    images = root / "images" / "bank_card"
    images.mkdir(parents=True)
    for i in range(2):
        torch.manual_seed(i)
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(images / f"{i}.png")
    paths["images"] = root / "images"
    return paths


def test_a_checkpoint_with_a_payload_is_refused_before_it_runs(files):
    marker = files["payload"].parent / "pwned"
    with pytest.raises(CheckpointError, match="refused to load .*other than tensors and plain data"):
        read_checkpoint(files["payload"])
    with pytest.raises(CheckpointError, match="refused"):
        CheckpointEmbedder(files["payload"], device="cpu")
    assert not marker.exists()
    torch.load(files["payload"], weights_only=False)  # the file does carry a payload: loading it unsafely runs it
    assert marker.exists()
    marker.rmdir()


@pytest.mark.parametrize("kind, says", [("text", "a text file"), ("npz", "NumPy .npz archive"),
                                        ("onnx", "an ONNX model"), ("empty", "an empty file"),
                                        ("truncated", "damaged or truncated"), ("folder", "a folder")])
def test_wrong_kinds_of_files_are_named(files, kind, says):
    with pytest.raises(CheckpointError, match=says):
        read_checkpoint(files[kind])


def test_a_real_checkpoint_loads(files):
    embedder = CheckpointEmbedder(files["good"], device="cpu")
    assert embedder.dim == 16 and embedder(torch.rand(2, 3, 32, 32)).shape == (2, 16)


@pytest.mark.parametrize("kind", ["payload", "text", "npz", "onnx", "empty", "truncated", "folder"])
def test_every_subcommand_answers_a_wrong_model_file_with_one_line_and_status_2(files, kind, capsys, tmp_path):
    model = str(files[kind])
    registry = str(tmp_path / "reg.npz")
    commands = [["register", "-m", model, "-r", registry, str(files["images"])],
                ["classify", "-m", model, "-r", registry, str(files["images"])],
                ["remove", "-m", model, "-r", registry, "bank_card"],
                ["export", "-m", model, "-o", str(tmp_path / "out.onnx")],
                ["eval", "-m", model, str(files["images"])]]
    for command in commands:
        assert main(["--quiet", *command]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"fastpfc-doc {command[0]}: error: ") and err.count("\n") == 1, err
    assert not (files["payload"].parent / "pwned").exists()


@pytest.mark.parametrize("kind", ["good", "text", "onnx", "empty", "folder"])
def test_a_wrong_registry_file_gets_one_line_and_status_2(files, kind, capsys):
    assert main(["--quiet", "classify", "-m", str(files["good"]), "-r", str(files[kind]),
                 str(files["images"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpfc-doc classify: error: ") and err.count("\n") == 1, err
    assert "registry" in err


def test_the_same_weights_with_another_layout_are_another_model(files, tmp_path):
    """The appended layout and the averaged crops change the embeddings, so the layout's kind and
    weight and the crops are part of ``model_id``: thresholds and registries of one are not used
    with the other."""
    state = read_checkpoint(files["good"])
    assert "embed_crops" not in state["config"]  # a checkpoint from before the option: the image alone
    identities = {}
    for layout, weight, crops in [("colour", 0.0, "full"), ("lighting_robust", 0.0, "full"),
                                  ("lighting_robust", 0.5, "full"), ("lighting_robust", 0.4, "full"),
                                  ("colour", 0.5, "full"), ("colour", 0.5, "shifted"), ("colour", 0.0, "shifted")]:
        path = tmp_path / f"{layout}-{weight}-{crops}" / "checkpoint.pt"
        path.parent.mkdir()
        save_checkpoint(path, {"model": state["model"], "config": {**state["config"], "layout": layout,
                                                                   "layout_weight": weight, "embed_crops": crops}})
        identities[layout, weight, crops] = CheckpointEmbedder(path, device="cpu").model_id
    assert (identities["colour", 0.0, "full"] == identities["lighting_robust", 0.0, "full"]
            == CheckpointEmbedder(files["good"]).model_id)
    assert len(set(identities.values())) == 6
    points = [{"target_fpr": 1e-4, "threshold": 0.8, "reliable": True}]
    other = tmp_path / "lighting_robust-0.4-full"  # its eval.json of the same weights at layout weight 0.5
    (other / "eval.json").write_text(json.dumps(
        {"trained": {"model_id": identities["lighting_robust", 0.5, "full"], "verification": {"points": points}}}))
    with pytest.warns(UserWarning, match="evaluated another model .* another layout"):
        assert CheckpointEmbedder(other / "checkpoint.pt", device="cpu").operating_points == {}


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "state.pt", {"model": {}, "rng": rng_state()})
    expected = (torch.rand(3), random.random(), np.random.standard_normal(2))
    set_rng_state(read_checkpoint(tmp_path / "state.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.array_equal(np.random.standard_normal(2), expected[2])


def test_checkpoints_of_earlier_versions_still_load(tmp_path):
    """Before, NumPy's state was pickled as its tuple (an array inside): still readable, nothing else is."""
    np.random.seed(4)
    legacy = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
              "cuda": None}
    torch.save({"model": {}, "rng": legacy}, tmp_path / "old.pt")
    expected = np.random.standard_normal(2)
    with pytest.warns(UserWarning, match="has no digest .* not verified"):
        set_rng_state(read_checkpoint(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.standard_normal(2), expected)


def test_a_full_disk_says_so_removes_the_partial_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """torch's zip writer reports a short write as a RuntimeError (what a full tmpfs gave): the
    error now says "no space left", the partial file is gone and the previous checkpoint is intact."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(4.0)})

    def short_write(state, target):
        Path(target).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 1024")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match="no space left on the device of .* while writing checkpoint.pt") as caught:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(4)})
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_other_write_errors_pass_through_and_leave_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"

    def broken(state, target):
        Path(target).write_bytes(b"x")
        raise KeyError("not a disk problem")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(KeyError, match="not a disk problem"):
        save_checkpoint(path, {"step": 2})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_saving_a_registry_or_text_is_reported_the_same_way(tmp_path):
    path = tmp_path / "reg.npz"
    path.write_bytes(b"the previous registry")
    with pytest.raises(OSError, match="no space left .* reg.npz; the partial file was removed"):
        with atomic_output(path, tmp_path / "reg.npz.partial.npz") as partial:
            partial.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # what numpy's write raises
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg.npz"]
    assert path.read_bytes() == b"the previous registry"


def test_no_changed_byte_of_a_checkpoint_loads_silently(files, tmp_path):
    """Single-byte changes at 40 seeded places of a real checkpoint: each copy is refused as
    damaged, or loads with exactly the original content (a byte the format ignores)."""
    original = files["good"].read_bytes()
    expected = read_checkpoint(files["good"])
    refused = 0
    for position, state in load_flipped(original, tmp_path, ".pt", read_checkpoint, CheckpointError, 40, seed=5):
        refused += state is None
        assert state is None or content_digest(state) == content_digest(expected), f"byte {position} changed it"
    assert refused >= 30  # almost every byte matters; most of the file is tensor data
