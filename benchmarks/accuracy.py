"""Accuracy benchmark: train model_x and model_y with train.py's default recipe on FER-2013, select and
schedule on validation (the PublicTest rows), fit the ensemble on validation, and print a table of
validation accuracy without and with test-time augmentation, macro-F1, training minutes and epochs.

    python benchmarks/accuracy.py                      # 7 classes, then 6 (disgust left out), ../shared/data/fer2013
    python benchmarks/accuracy.py --classes 7          # one setting only
    python benchmarks/accuracy.py --skip-training      # re-evaluate the checkpoints already trained

It runs the user's own commands (train.py, then evaluate.py once per TTA mode) as subprocesses, keeps
the checkpoints under --out/fer7 and --out/fer6, and writes one table for all settings to
--out/accuracy.json and accuracy.md.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine

TTA_MODES = ["none", "flip", "tencrop"]


def six_class_view(source, folder):
    """FER-2013 without disgust, as a tree of symbolic links (no image is copied)."""
    for split_dir in sorted(p for p in Path(source).iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name != "disgust"):
            target = folder / split_dir.name / class_dir.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink(class_dir.resolve(), target)
    return folder


def run(command):
    print("$", " ".join(map(str, command)), flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, check=True)
    return time.perf_counter() - started


def training_summary(run_dir):
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return {"epochs": len(rows), "train_minutes": sum(float(r["seconds"]) for r in rows) / 60,
            "best_epoch_val_acc": max(float(r["val_acc"]) for r in rows)}


def markdown_table(settings, where):
    lines = [f"FER-2013 validation (the PublicTest rows), train.py's default recipe, on {where}", "",
             "| classes | model | val acc | val acc, flip TTA | val acc, ten-crop TTA | macro-F1 (ten-crop) "
             "| train min | wall min | epochs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for classes, results in settings.items():
        for name, r in results.items():
            minutes = f"{r['train_minutes']:.1f}" if "train_minutes" in r else ""
            wall = f"{r['wall_minutes']:.1f}" if "wall_minutes" in r else ""
            lines.append(f"| {classes} | {name} | {100 * r['none']:.2f}% | {100 * r['flip']:.2f}% | "
                         f"{100 * r['tencrop']:.2f}% | {r['macro_f1_tencrop']:.3f} | {minutes} | {wall} | "
                         f"{r.get('epochs', '')} |")
    lines += ["", "train min: the training epochs' own seconds (metrics.csv); wall min: the whole train.py call "
              "for that model (data loading and validation passes included)."]
    return "\n".join(lines)


def benchmark(classes, args, out):
    """Train (unless --skip-training) and evaluate one class setting: {model: figures and times}."""
    out = out / f"fer{classes}"
    source = Path(args.data) if classes == 7 else six_class_view(args.data, out / "data")
    for name in [] if args.skip_training else args.models:  # one train.py call each, timed on its own
        seconds = run(["train.py", "--data", source, "--out", out, "--overwrite", "--models", name, *args.train_args])
        (out / name / "wall.json").write_text(json.dumps({"seconds": seconds, "train_args": args.train_args}))
    results = {}
    for tta in TTA_MODES:
        run(["evaluate.py", "--runs", out, "--data", source, "--split", "val", "--tta", tta,
             "--out", out / f"evaluation_{tta}"])
        report = json.loads((out / f"evaluation_{tta}" / "report.json").read_text())
        for name, figures in [*report["models"].items(), ("ensemble", report.get("ensemble"))]:
            if figures:
                results.setdefault(name, {})[tta] = figures["accuracy"]
                results[name][f"macro_f1_{tta}"] = figures["macro_f1"]
    for name in results:
        if (out / name / "metrics.csv").exists():
            results[name].update(training_summary(out / name))
        if (out / name / "wall.json").exists():
            wall = json.loads((out / name / "wall.json").read_text())
            results[name].update(wall_minutes=wall["seconds"] / 60, train_args=wall["train_args"])
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"),
                        help="FER-2013 folder with train/ and val/")
    parser.add_argument("--classes", type=int, nargs="+", choices=[6, 7], default=[7, 6],
                        help="class settings to run, in order: 7, and 6 (disgust left out, the apollo2506 setting)")
    parser.add_argument("--out", default="runs/accuracy", help="folder for checkpoints, reports and the table")
    parser.add_argument("--models", nargs="+", default=["model_x", "model_y"],
                        help="models to train (each in its own train.py call); the ensemble uses every model in --out")
    parser.add_argument("--skip-training", action="store_true",
                        help="evaluate the checkpoints already in --out (their recorded wall time is kept)")
    parser.add_argument("train_args", nargs="*", help="extra train.py flags, after --, e.g. -- --epochs 30")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"error: {args.data} is not a folder; pass --data with FER-2013's train/ and val/ folders")
    out = (ROOT / args.out).resolve()
    settings = {classes: benchmark(classes, args, out) for classes in args.classes}
    m = machine()
    where = (f"{m['processor']} (bf16 matmul peak {m['bf16_matmul_peak_gmacs']} G multiply-adds/s), "
             f"{m['usable_cpus']} CPU cores, torch {m['torch']}")
    table = markdown_table(settings, where)
    print("\n" + table)
    (out / "accuracy.json").write_text(json.dumps({"settings": settings, "machine": m,
                                                   "data": str(args.data)}, indent=2))
    (out / "accuracy.md").write_text(table + "\n")
    print(f"\nwrote {out}/accuracy.json and accuracy.md")


if __name__ == "__main__":
    main()
