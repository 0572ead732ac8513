"""ensemble.py known answers, and evaluate.py end to end on tiny trained runs."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import QUICK_TRAINING
from PIL import Image

from ferkit import cli
import ensemble
import evaluate
from ferkit import inference
from ferkit import synthetic
import train


def test_weighted_average_known_answer():
    a = np.array([[1.0, 0.0], [0.5, 0.5]])
    b = np.array([[0.0, 1.0], [0.1, 0.9]])
    np.testing.assert_allclose(ensemble.weighted_average([a, b], [0.25, 0.75]), [[0.25, 0.75], [0.2, 0.8]])


def test_minimum_nll_weights_known_answer():
    """Two members each right on half the images, mirror images of each other: by symmetry the NLL
    optimum is exactly half and half."""
    labels = np.zeros(4, dtype=int)
    a = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    b = a[::-1].copy()
    np.testing.assert_allclose(ensemble.minimum_nll_weights([a, b], labels), [0.5, 0.5], atol=1e-3)


def test_fit_puts_all_weight_on_a_perfect_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    perfect = np.eye(3)[labels] * 0.8 + 0.2 / 3
    noise = rng.dirichlet(np.ones(3), 200)
    fit = ensemble.fit_weights([noise, perfect], labels, ["noise", "perfect"])
    assert fit["val_accuracy"] == 1.0
    np.testing.assert_allclose(fit["weights"], [0, 1], atol=1e-3)


def test_fitted_ensemble_is_never_below_its_best_member():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    members = [rng.dirichlet(np.ones(5), 300) * 0.6 + 0.4 * np.eye(5)[labels] * rng.random((300, 1))
               for _ in range(3)]
    fit = ensemble.fit_weights(members, labels, ["a", "b", "c"])
    assert fit["val_accuracy"] >= max(ensemble.accuracy(m, labels) for m in members)
    assert min(fit["weights"]) >= 0 and sum(fit["weights"]) == pytest.approx(1, abs=1e-5)


def test_evaluate_writes_reports_and_confusion_pngs(trained_runs):
    out = trained_runs / "evaluation"
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"model_x", "model_y"} and "ensemble" in report
    for figures in [*report["models"].values(), report["ensemble"]]:
        assert 0 <= figures["accuracy"] <= 1 and len(figures["confusion_matrix"]) == 7
        assert sum(map(sum, figures["confusion_matrix"])) == 7 * 4  # synthetic:20 has 4 test images a class
    assert sum(report["ensemble"]["weights"].values()) == pytest.approx(1, abs=1e-5)
    for name in ("model_x", "model_y", "ensemble"):
        assert Image.open(out / f"confusion_{name}.png").size[0] > 500
    assert "## ensemble" in (out / "report.md").read_text()
    saved = ensemble.load_ensemble(out / "ensemble.json")
    assert [m["path"] for m in saved["members"]] == ["../model_x/best.pt", "../model_y/best.pt"]  # relative to out
    assert {n: (f["evaluated"], f["left_out"]) for n, f in report["models"].items()} == \
        {"model_x": (7 * 4, 0), "model_y": (7 * 4, 0)}


def test_evaluate_reuses_a_matching_ensemble(trained_runs, tmp_path, capsys):
    args = ["--runs", str(trained_runs), "--out", str(trained_runs / "evaluation"), "--tta", "none"]
    evaluate.main(args)
    assert "reusing ensemble weights" in capsys.readouterr().out
    evaluate.main(args + ["--refit"])
    assert "fitted on" in capsys.readouterr().out


@pytest.mark.parametrize("tta", ["flip", "tencrop", "tencrop-full"])
def test_tta_probabilities_are_distributions(trained_runs, tta):
    model = inference.load_member(trained_runs / "model_y" / "best.pt").model
    images = torch.randint(0, 256, (9, 1, 48, 48), dtype=torch.uint8)
    probs = inference.predict_probs(model, images, tta)
    assert probs.shape == (9, 7)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("tta", inference.TTA_CHOICES)
def test_each_tta_makes_the_views_its_table_counts(tta):
    assert len(inference.tta_views(torch.rand(2, 1, 48, 48), tta)) == inference.TTA_VIEWS[tta]


def test_tencrop_full_views_are_the_ten_crops_then_the_whole_image_and_its_mirror():
    images = torch.rand(2, 1, 48, 48)
    crops, views = inference.tta_views(images, "tencrop"), inference.tta_views(images, "tencrop-full")
    assert len(crops) == 10 and len(views) == 12
    for crop, view in zip(crops, views):
        torch.testing.assert_close(crop, view)
    torch.testing.assert_close(views[10], images)
    torch.testing.assert_close(views[11], images.flip(-1))


def test_centre_3_views_are_centre_fulls_less_the_unmirrored_whole_image():
    images = torch.rand(2, 1, 48, 48)
    three, four = inference.tta_views(images, "centre-3"), inference.tta_views(images, "centre-full")
    assert len(three) == 3 and len(four) == 4
    for kept, view in zip(three, four):
        torch.testing.assert_close(kept, view)
    torch.testing.assert_close(three[2], images.flip(-1))
    torch.testing.assert_close(four[3], images)
    assert not torch.equal(three[0], images)

def write_apollo_folder(root, per_class=4):
    """A 6-class apollo2506-style tree (no disgust, 'Suprise') of synthetic faces."""
    images, labels, classes = synthetic.render_split("test", per_class=per_class)
    folder_names = {"angry": "Angry", "fear": "Fear", "happy": "Happy", "neutral": "Neutral", "sad": "Sad",
                    "surprise": "Suprise"}
    for i, (image, label) in enumerate(zip(images, labels)):
        if classes[label] in folder_names:
            path = root / "Testing" / "Testing" / folder_names[classes[label]] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    shutil.copytree(root / "Testing" / "Testing", root / "Training" / "Training")
    return root


def test_seven_class_model_on_six_class_data(trained_runs, tmp_path):
    apollo = write_apollo_folder(tmp_path / "apollo")
    report = evaluate.main(["--checkpoints", str(trained_runs / "model_x" / "best.pt"), "--data", str(apollo),
                            "--out", str(tmp_path / "eval"), "--tta", "none"])
    figures = report["models"]["model_x"]
    assert figures["left_out"] == 0 and figures["per_class"]["disgust"]["support"] == 0
    assert sum(map(sum, figures["confusion_matrix"])) == 24


def test_six_class_model_on_seven_class_data(tmp_path, capsys):
    apollo = write_apollo_folder(tmp_path / "apollo")
    train.main(["--data", str(apollo), "--epochs", "1", "--out", str(tmp_path / "runs"), "--models", "model_y",
                *QUICK_TRAINING])
    report = evaluate.main(["--runs", str(tmp_path / "runs"), "--data", "synthetic:20",
                            "--out", str(tmp_path / "eval"), "--tta", "none"])
    figures = report["models"]["model_y"]
    assert figures["left_out"] == 4 and "disgust" not in figures["per_class"]
    assert "knows no class disgust: left out 4 of 28 images" in capsys.readouterr().out


def test_error_when_no_checkpoints(tmp_path):
    with pytest.raises(cli.UsageError, match=r"no checkpoints found: looked for .*\*\*/best.pt.*python train.py"):
        evaluate.main(["--runs", str(tmp_path)])


def test_error_names_a_checkpoint_that_does_not_load(tmp_path):
    bad = tmp_path / "model_x" / "best.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(cli.UsageError, match=f"cannot use checkpoint {bad}"):
        evaluate.main(["--runs", str(tmp_path)])


def test_error_when_ensemble_members_have_different_classes(trained_runs, tmp_path):
    checkpoint = torch.load(trained_runs / "model_y" / "best.pt", weights_only=True)
    checkpoint["classes"] = [*checkpoint["classes"][:6], "contempt"]
    other = tmp_path / "other" / "best.pt"
    other.parent.mkdir()
    torch.save(checkpoint, other)
    with pytest.raises(cli.UsageError, match="different class lists.*contempt"):
        evaluate.main(["--checkpoints", str(trained_runs / "model_x" / "best.pt"), str(other),
                       "--out", str(tmp_path / "eval"), "--tta", "none"])


def test_an_ensemble_of_three_architectures_works_end_to_end(trained_runs, tmp_path):
    runs = shutil.copytree(trained_runs, tmp_path / "runs", ignore=shutil.ignore_patterns("evaluation"))
    train.main(["--data", "synthetic:20", "--epochs", "1", "--out", str(runs), "--models", "model_z", *QUICK_TRAINING])
    evaluate.main(["--runs", str(runs), "--out", str(runs / "evaluation"), "--tta", "flip"])
    saved = ensemble.load_ensemble(runs / "evaluation" / "ensemble.json")
    assert [m["path"] for m in saved["members"]] == [f"../{name}/best.pt" for name in ("model_x", "model_y", "model_z")]
    predictor = inference.Predictor.from_ensemble(runs / "evaluation" / "ensemble.json")
    probabilities = predictor.probabilities(torch.randint(0, 256, (2, 1, 48, 48), dtype=torch.uint8))
    assert probabilities.shape == (2, 7) and np.allclose(probabilities.sum(1), 1, atol=1e-3)
