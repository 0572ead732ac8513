"""Knowledge distillation for train.py (--teacher): trained models' averaged probabilities on every
training image, computed once before the first epoch, mixed into the training targets (Hinton et al.
2015, "Distilling the knowledge in a neural network"). FER-2013's labels are noisy, and a teacher's
probabilities say how ambiguous each face is, which a one-hot label cannot."""
import torch
import torch.nn.functional as F

from ferkit import cli
from ferkit.inference import TTA_CHOICES, Predictor


def add_flags(p):
    """train.py's distillation flags on the parser `p`."""
    p.add_argument("--teacher", nargs="+", default=None,
                   help="checkpoint (.pt) or shipped (.safetensors) files of trained models whose averaged "
                        "probabilities on each training image become part of its target (unset: no distillation)")
    p.add_argument("--distill-weight", type=cli.probability, default=0.5,
                   help="with --teacher: the teacher's share of each target, the one-hot label having the rest")
    p.add_argument("--teacher-tta", default="flip", choices=TTA_CHOICES,
                   help="with --teacher: the test-time augmentation of the teacher's predictions")


def check_flags(args):
    """Refuse what distillation cannot be combined with, before any work."""
    if args.teacher and (args.mixup or args.cutmix):
        raise cli.UsageError("--teacher cannot be combined with --mixup or --cutmix: the mixers take class "
                             "indices, not the teacher's probabilities")


def teacher_probabilities(paths, split, tta, device, precision):
    """The teachers' mean softmax probabilities [N, C] on `split`'s images, on `device` (None without
    teachers); a UsageError when a teacher's class list is not the data's."""
    if not paths:
        return None
    teachers = Predictor([(path, 1.0) for path in paths], tta, device=device, precision=precision)
    if teachers.classes != list(split.classes):
        raise cli.UsageError(f"the teachers know the classes {', '.join(teachers.classes)}; the data has "
                             f"{', '.join(split.classes)}. Pass teachers trained on this data.")
    return torch.from_numpy(teachers.probabilities(split.images)).float().to(device)


def soft_targets(labels, teacher_probs, weight):
    """Per-image class probabilities: `weight` of the teacher's, the rest on the labelled class."""
    one_hot = F.one_hot(labels, teacher_probs.shape[1]).to(teacher_probs.dtype)
    return (1 - weight) * one_hot + weight * teacher_probs
