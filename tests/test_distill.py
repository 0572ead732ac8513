"""Knowledge distillation (train.py --teacher): the targets, the teacher's checks, and a student that
learns what its teacher says."""
import pytest
import torch

from ferkit import cli
from ferkit import distill
import train
from conftest import QUICK_TRAINING
from data import load_train_val
from ferkit.inference import load_member, predict_probs
from models import build_model

SYNTHETIC = "synthetic:20"


def test_soft_targets_put_the_teachers_share_beside_the_label():
    labels = torch.tensor([0, 2])
    teacher = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    targets = distill.soft_targets(labels, teacher, 0.25)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert torch.allclose(targets[0], torch.tensor([0.775, 0.15, 0.075]))
    assert torch.equal(distill.soft_targets(labels, teacher, 0.0), torch.tensor([[1., 0, 0], [0, 0, 1]]))
    assert torch.equal(distill.soft_targets(labels, teacher, 1.0), teacher)


def constant_teacher(path, classes, favourite):
    """A model_y checkpoint that gives `favourite` nearly all the probability, whatever the image."""
    model = build_model("model_y", len(classes))
    classifier = model[-1]
    torch.nn.init.zeros_(classifier.weight)
    with torch.no_grad():
        classifier.bias.copy_(torch.full((len(classes),), -10.0))
        classifier.bias[favourite] = 10.0
    torch.save({"model_name": "model_y", "classes": classes, "model": model.state_dict(),
                "config": {"data": SYNTHETIC}}, path)
    return path


def share_predicted(run_dir, split, favourite):
    student = load_member(run_dir / "last.pt")
    return (predict_probs(student.model, split.images).argmax(1) == favourite).mean()


def test_a_student_follows_its_teacher_by_the_distill_weight(tmp_path):
    train_split, val = load_train_val(SYNTHETIC)
    teacher = constant_teacher(tmp_path / "teacher.pt", train_split.classes, favourite=3)
    shares = {}
    for weight in ("0", "1"):
        train.main(["--data", SYNTHETIC, "--epochs", "2", "--models", "model_y", "--out", str(tmp_path / weight),
                    "--teacher", str(teacher), "--distill-weight", weight, *QUICK_TRAINING])
        shares[weight] = share_predicted(tmp_path / weight / "model_y", val, favourite=3)
    # Taught by the teacher alone, the student says what it says; taught by the labels, it spreads its answers.
    assert shares["1"] > 0.9 > 0.5 > shares["0"]


def test_teacher_probabilities_average_the_teachers(tmp_path):
    split, _ = load_train_val(SYNTHETIC)
    classes = split.classes
    paths = [constant_teacher(tmp_path / f"teacher-{favourite}.pt", classes, favourite) for favourite in (1, 4)]
    probs = distill.teacher_probabilities(paths, split, "flip", torch.device("cpu"), "fp32")
    assert probs.shape == (len(split.labels), len(classes))
    assert torch.allclose(probs[:, 1], torch.full((len(split.labels),), 0.5), atol=1e-3)
    assert torch.allclose(probs[:, 4], torch.full((len(split.labels),), 0.5), atol=1e-3)


def test_a_teacher_of_other_classes_is_refused(tmp_path):
    split, _ = load_train_val(SYNTHETIC)
    teacher = constant_teacher(tmp_path / "six.pt", split.classes[:6], favourite=0)
    with pytest.raises(cli.UsageError, match="the teachers know the classes"):
        distill.teacher_probabilities([teacher], split, "none", torch.device("cpu"), "fp32")


def test_a_teacher_with_mixup_is_refused_before_any_work(tmp_path):
    with pytest.raises(cli.UsageError, match="--teacher cannot be combined with --mixup"):
        train.main(["--data", SYNTHETIC, "--out", str(tmp_path), "--teacher", "absent.pt", "--mixup", "0.2"])


def test_a_teacher_run_resumed_with_mixup_is_refused(tmp_path):
    split, _ = load_train_val(SYNTHETIC)
    teacher = constant_teacher(tmp_path / "teacher.pt", split.classes, favourite=0)
    flags = ["--data", SYNTHETIC, "--models", "model_y", "--out", str(tmp_path / "runs"), *QUICK_TRAINING]
    train.main([*flags, "--epochs", "1", "--teacher", str(teacher)])
    with pytest.raises(cli.UsageError, match="--teacher cannot be combined with --mixup"):
        train.main([*flags, "--epochs", "2", "--resume", "--mixup", "0.2"])
