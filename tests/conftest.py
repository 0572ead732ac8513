"""Shared fixtures: the repository on sys.path, small image trees, and tiny trained runs."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_FER = ROOT.parent / "shared" / "data" / "fer2013"

# Fast enough for a unit test, and still learns the synthetic faces. fp32 whatever `--precision auto`
# would pick on this CPU, so that no verdict rides on bf16 rounding (a test of bf16 asks for it).
QUICK_TRAINING = ["--batch-size", "32", "--lr", "0.01", "--rotation", "0", "--crop-scale", "1",
                  "--erasing", "0", "--brightness", "0", "--contrast", "0", "--precision", "fp32"]


def write_image(path, size=(48, 48), mode="L", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8), mode).save(path)
    return path


def write_class_tree(root, classes, per_class=3, size=(48, 48), mode="L", suffix=".png"):
    """root/<class>/<i>.png for each class, distinct random pixels."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}{suffix}", size, mode, seed=100 * c + i)
    return root


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """model_x and model_y trained for one epoch on small synthetic data, with an evaluation."""
    import evaluate
    import train
    out = tmp_path_factory.mktemp("runs")
    train.main(["--data", "synthetic:20", "--epochs", "1", "--out", str(out), *QUICK_TRAINING])
    evaluate.main(["--runs", str(out), "--out", str(out / "evaluation"), "--tta", "none"])
    return out


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Decoded-image caches of test fixtures go to a temporary folder, not the repository's .cache/."""
    import data
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path_factory.getbasetemp() / "cache")
