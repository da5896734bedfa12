"""Image folders as data: both layouts, the cached listing, clear errors, and a run on folders."""

import pytest
import torch

import fastpfc.doc.folders as folders
from fastpfc.doc.folders import ImageFolderDataset, list_images
from fastpfc.doc.synthetic import DocumentType


def _tree(root, classes: int, per_class: int, type_offset: int = 0):
    """root/<class>/<n>.png (and a nested folder for the last class), images from synthetic types."""
    for c in range(classes):
        folder = root / f"class_{c:02d}" / ("nested" if c == classes - 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            DocumentType.from_id(type_offset + c).render(i).save(folder / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_layouts(tmp_path):
    root = _tree(tmp_path / "data", classes=3, per_class=2)
    per_image = ImageFolderDataset(root, "per_image", size=32)
    assert len(per_image) == per_image.num_classes == 6 and per_image.labels == list(range(6))
    by_folder = ImageFolderDataset(root, "subfolders", size=32)
    assert by_folder.num_classes == 3 and by_folder.labels == [0, 0, 1, 1, 2, 2]
    image, label = by_folder[(5, 3)]
    assert image.shape == (3, 32, 32) and label == 2 and 0 <= image.min() and image.max() <= 1


def test_listing_is_cached(tmp_path, monkeypatch):
    root = _tree(tmp_path / "data", classes=2, per_class=2)
    first = list_images(root, tmp_path / "cache")
    monkeypatch.setattr(folders, "_walk", None)  # a second listing would fail: the cache must answer
    assert list_images(root, tmp_path / "cache") == first


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    root = _tree(tmp_path / "data", classes=1, per_class=1)
    (root / "class_00" / "broken.png").write_bytes(b"not a png")
    data = ImageFolderDataset(root, "subfolders", size=16)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        data[data.paths.index("class_00/broken.png")]
    (root / "loose.png").write_bytes((root / "class_00" / "nested" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="needs every image in a class folder"):
        ImageFolderDataset(root, "subfolders")


def test_training_on_folders(tmp_path):
    pytest.importorskip("timm")
    from fastpfc.doc.training import TrainConfig, train

    train_root = _tree(tmp_path / "train", classes=6, per_class=2)
    eval_root = _tree(tmp_path / "eval", classes=4, per_class=3, type_offset=100)
    config = TrainConfig(run_dir=str(tmp_path / "run"), data=str(train_root), eval_data=str(eval_root),
                         image_size=64, embedding_size=16, steps=3, batch_size=4, warmup_steps=1, workers=0,
                         real_captures=0)
    results = train(config, progress=False)
    assert results["trained"]["verification"]["num_genuine"] == 4 * 3
    assert results["trained"]["registration"]["num_registered_queries"] == 2 * 3 - 2  # not the registered images
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["loss"]["weight"].shape == (12, 16)  # every training image its own class


def test_training_draws_are_camera_captures(tmp_path):
    root = _tree(tmp_path / "data", classes=2, per_class=1)
    plain = ImageFolderDataset(root, "per_image", size=32)
    augmented = ImageFolderDataset(root, "per_image", size=32, augment=True)
    assert torch.equal(augmented[1][0], plain[1][0])  # an index alone is the image resized
    first, again, second = augmented[(1, 0)][0], augmented[(1, 0)][0], augmented[(1, 1)][0]
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert not torch.equal(first, plain[1][0]) and first.shape == (3, 32, 32)
