"""data.py (loading and its training augmentation) and synthetic.py on small fixture trees built here."""
import os

import numpy as np
import pytest
import torch
from conftest import SHARED_FER, write_class_tree, write_image

import data
from ferkit import synthetic

FER7 = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


def load(source, split, tmp_path):
    return data.load_split(source, split, cache_dir=tmp_path / "cache")


def test_kaggle_fer2013_layout(tmp_path):
    root = tmp_path / "fer"
    write_class_tree(root / "train", FER7, per_class=2)
    write_class_tree(root / "test", FER7, per_class=1)
    train = load(root, "train", tmp_path)
    assert train.images.shape == (14, 1, 48, 48) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.classes == FER7
    assert torch.bincount(train.labels).tolist() == [2] * 7
    assert len(load(root, "test", tmp_path).labels) == 7
    with pytest.raises(data.DataError, match="no 'val' split"):
        load(root, "val", tmp_path)


def test_apollo_layout_nesting_and_misspelling(tmp_path):
    root = tmp_path / "facial-recognition-dataset"
    names = ["Angry", "Fear", "Happy", "Neutral", "Sad", "Suprise"]
    write_class_tree(root / "Training" / "Training", names, per_class=2, size=(100, 100), mode="RGB",
                     suffix=".jpg")
    write_class_tree(root / "Testing" / "Testing", names, per_class=1)
    train = load(root, "train", tmp_path)
    assert train.classes == ["angry", "fear", "happy", "neutral", "sad", "surprise"]
    assert train.images.shape == (12, 1, 48, 48)
    assert load(root, "test", tmp_path).classes == train.classes


def test_split_names_match_without_case_and_bare_folder(tmp_path):
    root = tmp_path / "d"
    write_class_tree(root / "TRAINING", ["happy", "sad"])
    write_class_tree(root / "PublicTest", ["happy", "sad"], per_class=1)
    assert data.available_splits(root) == ["train", "val"]
    assert len(load(root, "val", tmp_path).labels) == 2
    bare = write_class_tree(tmp_path / "bare", ["Happiness", "Sadness", "anger"])
    split = load(bare, "test", tmp_path)
    assert split.classes == ["angry", "happy", "sad"] and len(split.labels) == 9


def test_unreadable_files_are_skipped_and_named(tmp_path, capsys):
    root = write_class_tree(tmp_path / "d", ["happy", "sad"])
    (root / "happy" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "sad" / "notes.txt").write_text("hello")
    (tmp_path / "d" / "empty_class").mkdir()
    split = load(root, "train", tmp_path)
    assert len(split.labels) == 6 and split.classes == ["happy", "sad"]
    output = capsys.readouterr().out
    assert "broken.jpg" in output and "notes.txt" in output
    assert "skipped 2 unreadable file(s)" in output and "empty_class is empty" in output


def test_clear_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        load(tmp_path / "missing", "train", tmp_path)
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(data.DataError, match="is a file"):
        load(tmp_path / "file.bin", "train", tmp_path)
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(data.DataError, match="no class folders"):
        load(tmp_path / "flat", "train", tmp_path)
    (tmp_path / "junk" / "happy").mkdir(parents=True)
    (tmp_path / "junk" / "happy" / "a.jpg").write_text("text")
    with pytest.raises(data.DataError, match="none of the 1 files"):
        load(tmp_path / "junk", "train", tmp_path)


def write_csv(path, rows, header="emotion,pixels,Usage", newline="\n", bom=""):
    path.write_text(bom + newline.join([header, *rows]) + newline, newline="")
    return path


def pixels(value=7):
    return " ".join([str(value)] * 2304)


def test_fer2013_csv_both_formats(tmp_path):
    rows = [f"3,{pixels(1)},Training", f"6,{pixels(2)},Training", f"0,{pixels(3)},PublicTest", "",
            f"5,{pixels(4)},PrivateTest"]
    fer = write_csv(tmp_path / "fer2013.csv", rows, newline="\r\n", bom="\ufeff")
    train = load(fer, "train", tmp_path)
    assert train.classes == ["angry", "happy", "neutral", "surprise"]  # present labels, canonical order
    assert [train.classes[i] for i in train.labels] == ["happy", "neutral"]
    assert int(train.images[1, 0, 0, 0]) == 2
    assert load(fer, "val", tmp_path).labels.tolist() == [0]
    icml_rows = [f"3, Training,{pixels(1)}", f"0, PublicTest,{pixels(3)}"]
    icml = write_csv(tmp_path / "icml_face_data.csv", icml_rows, header="emotion, Usage, pixels")
    assert load(icml, "train", tmp_path).classes == ["angry", "happy"]


@pytest.mark.parametrize("row, message", [
    ("x,{p},Training", "row 2: emotion 'x' is not a whole number"),
    ("9,{p},Training", "row 2: emotion 9 is out of range"),
    ("1,{short},Training", "row 2: expected 2304 pixel values"),
    ("1,{p},Elsewhere", "row 2: Usage 'Elsewhere'"),
])
def test_fer2013_csv_bad_rows(tmp_path, row, message):
    path = write_csv(tmp_path / "fer2013.csv", [row.format(p=pixels(), short=" ".join(["1"] * 2303))])
    with pytest.raises(data.DataError, match=message):
        load(path, "train", tmp_path)


def test_fer2013_csv_missing_column(tmp_path):
    path = write_csv(tmp_path / "fer2013.csv", [f"1,{pixels()}"], header="emotion,pixels")
    with pytest.raises(data.DataError, match="missing column"):
        load(path, "train", tmp_path)


def test_cache_reused_then_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    root = write_class_tree(tmp_path / "d", ["happy", "sad"])
    first = load(root, "train", tmp_path)
    monkeypatch.setattr(data, "decode_files", lambda *a: pytest.fail("decoded again despite the cache"))
    assert torch.equal(load(root, "train", tmp_path).images, first.images)
    monkeypatch.undo()
    write_image(root / "happy" / "0.png", seed=999)
    os.utime(root / "happy" / "0.png", ns=(1, 1))
    changed = load(root, "train", tmp_path)
    assert not torch.equal(changed.images, first.images)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the stale cache was removed


def test_corrupt_cache_is_rebuilt(tmp_path, capsys):
    root = write_class_tree(tmp_path / "d", ["happy", "sad"])
    first = load(root, "train", tmp_path)
    cache_file = next((tmp_path / "cache").glob("*.npz"))
    cache_file.write_bytes(cache_file.read_bytes()[:200])
    assert torch.equal(load(root, "train", tmp_path).images, first.images)
    assert "is corrupt" in capsys.readouterr().out


def test_carve_validation_is_stratified_and_seeded():
    split = data.to_split(*synthetic.render_split("train", per_class=20))
    train, val = data.carve_validation(split)
    assert torch.bincount(val.labels).tolist() == [2] * 7 and len(train.labels) == 126
    assert torch.equal(val.images, data.carve_validation(split)[1].images)


def test_synthetic_is_deterministic_balanced_and_prefix_stable():
    images, labels, classes = synthetic.render_split("train", per_class=10, seed=3)
    again, _, _ = synthetic.render_split("train", per_class=10, seed=3)
    larger, _, _ = synthetic.render_split("train", per_class=20, seed=3)
    assert classes == FER7 and images.shape == (70, 48, 48) and images.dtype == np.uint8
    assert np.array_equal(images, again) and np.array_equal(images, larger[:70])
    assert np.bincount(labels).tolist() == [10] * 7
    other_split, _, _ = synthetic.render_split("val", per_class=10, seed=3)
    assert not np.array_equal(images, other_split)
    assert len(data.load_split("synthetic:10", "val").labels) == 14


def test_synthetic_sample_grid(tmp_path):
    synthetic.save_sample_grid(tmp_path / "grid.png", per_class=2)
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_augmentation_shapes_ranges_and_determinism():
    images = torch.rand(64, 1, 48, 48)
    out = data.augment_batch(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, images)
    assert torch.equal(out, data.augment_batch(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, data.augment_batch(images, torch.Generator().manual_seed(2)))


def test_augmentation_off_is_identity_and_flip_flips():
    images = torch.rand(8, 1, 48, 48)
    off = dict(hflip=0, vflip=0, rotation=0, crop_scale=1, brightness=0, contrast=0, erasing=0)
    assert torch.equal(data.augment_batch(images, torch.Generator(), **off), images)
    flipped = data.augment_batch(images, torch.Generator(), **{**off, "hflip": 1.0})
    assert torch.allclose(flipped, images.flip(-1), atol=1e-5)


def test_train_size_cuts_a_window_at_the_images_scale():
    ramp = torch.arange(48.0).div(47).expand(4, 1, 48, 48)  # brightness rises one step a pixel, left to right
    off = dict(hflip=0, vflip=0, rotation=0, crop_scale=1, brightness=0, contrast=0, erasing=0)
    window = data.augment_batch(ramp, torch.Generator().manual_seed(0), train_size=40, **off)
    assert window.shape == (4, 1, 40, 40)
    assert torch.allclose(window.diff(dim=-1), torch.tensor(1 / 47), atol=1e-5)  # not resized: the same slope
    starts = window[:, 0, 0, 0] * 47
    assert starts.min() >= 0 and starts.max() <= 8 and len(set(starts.tolist())) > 1  # random places inside


def test_real_fer2013_images(tmp_path):
    if not SHARED_FER.is_dir():
        pytest.skip("../shared/data/fer2013 is not here (a fresh clone has no shared data)")
    root = tmp_path / "subset"
    for class_dir in sorted((SHARED_FER / "val").iterdir()):
        for image in sorted(class_dir.iterdir())[:40]:
            (root / "val" / class_dir.name).mkdir(parents=True, exist_ok=True)
            os.symlink(image, root / "val" / class_dir.name / image.name)
    split = load(root, "val", tmp_path)
    assert split.classes == FER7 and len(split.labels) == 280
    assert 60 < split.images.float().mean() < 200  # real faces, not blank frames
