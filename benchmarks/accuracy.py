"""Accuracy benchmark: train model_x and model_y with train.py's default recipe on FER-2013, select and
schedule on validation (the PublicTest rows), fit the ensemble on validation, and print a table of
validation accuracy without and with test-time augmentation, macro-F1, training minutes and epochs.

    python benchmarks/accuracy.py                      # 7 classes, ../shared/data/fer2013
    python benchmarks/accuracy.py --classes 6          # the apollo2506 setting: disgust left out

It runs the user's own commands (train.py, then evaluate.py once per TTA mode) as subprocesses, keeps
the checkpoints under --out, and writes the table to --out/accuracy.json and accuracy.md.
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def markdown_table(results, title):
    lines = [f"**{title}**", "",
             "| model | val acc | val acc, flip TTA | val acc, ten-crop TTA | macro-F1 (ten-crop) | train min | epochs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['none']:.2f}% | {100 * r['flip']:.2f}% | {100 * r['tencrop']:.2f}% | "
                     f"{r['macro_f1_tencrop']:.3f} | {r.get('train_minutes', 0):.1f} | {r.get('epochs', '')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"),
                        help="FER-2013 folder with train/ and val/")
    parser.add_argument("--classes", type=int, choices=[6, 7], default=7, help="7, or 6 (disgust left out)")
    parser.add_argument("--out", default="runs/accuracy", help="folder for checkpoints, reports and the table")
    parser.add_argument("--skip-training", action="store_true", help="evaluate the checkpoints already in --out")
    parser.add_argument("train_args", nargs="*", help="extra train.py flags, after --, e.g. -- --epochs 30")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"error: {args.data} is not a folder; pass --data with FER-2013's train/ and val/ folders")
    out = (ROOT / args.out / f"fer{args.classes}").resolve()
    source = Path(args.data) if args.classes == 7 else six_class_view(args.data, out / "data")
    wall = {}
    if not args.skip_training:
        wall["train"] = run(["train.py", "--data", source, "--out", out, "--overwrite", *args.train_args])
    results = {}
    for tta in TTA_MODES:
        wall[f"evaluate_{tta}"] = run(["evaluate.py", "--runs", out, "--data", source, "--split", "val",
                                       "--tta", tta, "--out", out / f"evaluation_{tta}"])
        report = json.loads((out / f"evaluation_{tta}" / "report.json").read_text())
        for name, figures in [*report["models"].items(), ("ensemble", report.get("ensemble"))]:
            if figures:
                results.setdefault(name, {})[tta] = figures["accuracy"]
                results[name][f"macro_f1_{tta}"] = figures["macro_f1"]
    for name in results:
        if (out / name / "metrics.csv").exists():
            results[name].update(training_summary(out / name))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    title = (f"FER-2013 validation (PublicTest, {args.classes} classes), default recipe; "
             f"training wall time {wall.get('train', 0) / 60:.1f} min on {machine}")
    table = markdown_table(results, title)
    print("\n" + table)
    (out / "accuracy.json").write_text(json.dumps({"results": results, "wall_seconds": wall, "machine": machine,
                                                   "classes": args.classes, "data": str(args.data),
                                                   "train_args": args.train_args}, indent=2))
    (out / "accuracy.md").write_text(table + "\n")
    print(f"\nwrote {out}/accuracy.json and accuracy.md")


if __name__ == "__main__":
    main()
