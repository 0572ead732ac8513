"""Ensembles drawn from a pool of trained members: how much each combination gains over its members, with
their probabilities averaged (evaluate.py's ensemble) and with their log-probabilities averaged (a
geometric mean), both with equal weights so that no fitting on validation flatters one combination; and
how often its members disagree, and how often at least one of them is right, which bound what it can gain.

    python benchmarks/ensemble_pool.py --data ../shared/data/fer2013 \
        --members x=runs/budgets/3h/model_x/best.pt y=runs/budgets/3h/model_y/best.pt z=runs/budgets/3h/model_z/best.pt \
        --combos x+y+z x+y y+z

Each member's validation probabilities are computed once (with --tta), then every combination is scored from
them. Validation only (the PublicTest rows): the test split is never read.
"""
import argparse

import numpy as np
import torch

from common import ROOT, machine, publish

import data  # noqa: E402  (common puts the repository on the path)
from ferkit import cli  # noqa: E402
from ferkit.cli import PRECISIONS  # noqa: E402
from ensemble import DEFAULT_TTA, TTA_CHOICES, accuracy, weighted_average  # noqa: E402
from ferkit.inference import align_classes, common_classes, load_member, predict_probs  # noqa: E402
from ferkit.device import resolve_precision  # noqa: E402


def named_path(text):
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CHECKPOINT, got {text!r}")
    return name, path


def member_probabilities(members, data_dir, tta, precision):
    """Validation labels and each named member's probabilities [N, C]."""
    loaded = {name: load_member(path) for name, path in members.items()}
    val = data.load_split(data_dir, "val")  # the training split is never needed here
    images, labels, _ = align_classes(val, common_classes(list(loaded.values())))
    probs = {}
    for name, member in loaded.items():
        probs[name] = predict_probs(member.model, images, tta, precision=precision)
        print(f"{name}: {100 * accuracy(probs[name], labels):.2f}% alone ({member.path})", flush=True)
    return probs, labels


def score_combination(member_probs, labels):
    """In percent: the members' mean accuracy; the images that at least one member gets right, and those on which
    the members' answers differ (an ensemble can gain only there); the equal-weight ensembles' accuracies."""
    stacked = np.stack(member_probs)
    equal = np.full(len(member_probs), 1 / len(member_probs))
    answers = stacked.argmax(2)  # [members, images]
    right = answers == labels
    return {"members_mean": 100 * float(right.mean()),  # every member answers every image: the mean of theirs
            "any_member_right": 100 * float(right.any(0).mean()),
            "members_disagree": 100 * float((answers != answers[0]).any(0).mean()),
            "probability_mean": 100 * accuracy(weighted_average(stacked, equal), labels),
            "log_probability_mean": 100 * accuracy(weighted_average(np.log(np.clip(stacked, 1e-12, None)), equal),
                                                   labels)}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"),
                        help="FER-2013 folder with train/ and val/")
    parser.add_argument("--members", type=named_path, nargs="+", required=True,
                        help="the pool: NAME=CHECKPOINT entries (best.pt or a shipped .safetensors file)")
    parser.add_argument("--combos", nargs="+", required=True,
                        help="combinations to score, member names joined by +, e.g. x+y+z")
    parser.add_argument("--tta", choices=TTA_CHOICES, default=DEFAULT_TTA, help="test-time augmentation")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="autocast precision, as evaluate.py's --precision")
    parser.add_argument("--out", default="runs/benchmarks/ensemble_pool.json", help="JSON results file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    members = dict(args.members)
    unknown = sorted({name for combo in args.combos for name in combo.split("+")} - set(members))
    if unknown:
        parser.error(f"--combos name members not in --members: {', '.join(unknown)}")
    probs, labels = member_probabilities(members, args.data, args.tta,
                                         resolve_precision(args.precision, torch.device("cpu")))
    scores = {combo: score_combination([probs[name] for name in combo.split("+")], labels) for combo in args.combos}
    lines = [f"FER-2013 validation, {len(labels)} images, --tta {args.tta}, equal weights", "",
             "| members | members' mean | any member right | members disagree | mean of probabilities | "
             "mean of log-probabilities |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {combo} | {s['members_mean']:.2f}% | {s['any_member_right']:.2f}% | {s['members_disagree']:.2f}% | "
              f"{s['probability_mean']:.2f}% | {s['log_probability_mean']:.2f}% |" for combo, s in scores.items()]
    publish({"members": members, "tta": args.tta, "scores": scores, "machine": machine()}, "\n".join(lines),
            ROOT / args.out)


if __name__ == "__main__":
    cli.run(main)
