"""Evaluate trained checkpoints and their weighted ensemble: accuracy, macro-F1, a per-class report
and a confusion matrix (printed and as a PNG) for each, written to report.json and report.md.

    python evaluate.py                                   # every runs/**/best.pt, on its data's test split
    python evaluate.py --data ../shared/data/fer2013 --split val --tta flip
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torchvision.transforms.functional as TF
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix, f1_score
from tqdm import tqdm

import data
import ensemble
from files import safe_filename, write_atomic, write_text_atomic
from models import autocast, default_threads, load_checkpoint, model_from_checkpoint, pick_device, resolve_precision

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

TTA_CHOICES = ["none", "flip", "tencrop"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=None,
                   help="checkpoint files to evaluate; unset: every best.pt under --runs")
    p.add_argument("--runs", default="runs", help="folder searched for best.pt when --checkpoints is unset")
    p.add_argument("--data", default=None, help="data to evaluate on; unset: the data the first checkpoint was trained on")
    p.add_argument("--split", default="test", choices=list(data.SPLIT_ALIASES), help="split to report on")
    p.add_argument("--tta", default="tencrop", choices=TTA_CHOICES,
                   help="test-time augmentation: none, flip (mirror average), tencrop (corners+centre, mirrored; "
                        "the most accurate, ten forward passes per image)")
    p.add_argument("--out", default="runs/evaluation", help="folder for report.json, report.md and the PNGs")
    p.add_argument("--ensemble", default=None,
                   help="ensemble.json to reuse when it matches the checkpoints; unset: OUT/ensemble.json")
    p.add_argument("--refit", action="store_true", help="refit the ensemble weights even if a matching file exists")
    # Not larger: on 2 CPU cores, bf16 inference is faster at 128 images per batch than at 512 (README, speed).
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on CPU and recent GPUs")
    p.add_argument("--threads", type=int, default=default_threads(), help="CPU threads")
    return p


def tta_views(images, tta):
    """The views whose softmax outputs are averaged; images are float [B, 1, 48, 48]."""
    if tta == "flip":
        return [images, images.flip(-1)]
    if tta == "tencrop":  # Krizhevsky et al. 2012: four corners and centre of a slightly larger image, mirrored
        larger = TF.resize(images, [54, 54], antialias=True)
        return list(TF.ten_crop(larger, [48, 48]))
    return [images]


@torch.inference_mode()
def predict_probs(model, images, tta="none", batch_size=128, precision="fp32"):
    """Softmax probabilities [N, C] (numpy) for uint8 images [N, 1, 48, 48]."""
    device = next(model.parameters()).device
    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc="predicting", unit="batch", leave=False,
                      disable=None if len(images) > 4 * batch_size else True):
        batch = images[start:start + batch_size].to(device).float().div_(255)
        views = tta_views(batch, tta)
        with autocast(device, precision):
            probs = sum(torch.softmax(model(v.contiguous(memory_format=torch.channels_last)).float(), dim=1)
                        for v in views)
        outputs.append((probs / len(views)).cpu())
    return torch.cat(outputs).numpy()


def align_classes(split, model_classes):
    """Images of classes the model knows, with labels re-indexed to the model's class list."""
    to_model = {i: model_classes.index(c) for i, c in enumerate(split.classes) if c in model_classes}
    keep = np.array([int(label) in to_model for label in split.labels])
    unknown = sorted(set(split.classes) - set(model_classes))
    if unknown:
        print(f"note: the model knows no class {', '.join(unknown)}: left out {int((~keep).sum())} of "
              f"{len(keep)} images")
    if not keep.any():
        sys.exit(f"error: none of the data's classes ({', '.join(split.classes)}) is known to the model "
                 f"({', '.join(model_classes)}); evaluate it on data with those classes.")
    labels = np.array([to_model[int(label)] for label in split.labels[keep]], dtype=np.int64)
    return split.images[torch.from_numpy(keep)], labels, int((~keep).sum())


def classification_figures(probs, labels, classes):
    predictions = probs.argmax(1)
    indices = list(range(len(classes)))
    per_class = classification_report(labels, predictions, labels=indices, target_names=classes,
                                      output_dict=True, zero_division=0)
    recalls = {c: per_class[c]["recall"] for c in classes if per_class[c]["support"] > 0}
    return {"accuracy": float(np.mean(predictions == labels)),
            "macro_f1": float(f1_score(labels, predictions, labels=indices, average="macro", zero_division=0)),
            "per_class": {c: {k: round(float(per_class[c][k]), 4) for k in ("precision", "recall", "f1-score", "support")}
                          for c in classes},
            "confusion_matrix": confusion_matrix(labels, predictions, labels=indices).tolist(),
            "hardest_classes": sorted(recalls, key=recalls.get)[:2]}


def save_confusion_png(path, labels, probs, classes, title):
    figure, axes = plt.subplots(1, 2, figsize=(14, 6))
    for axis, normalize, name in ((axes[0], None, "counts"), (axes[1], "true", "row-normalised")):
        ConfusionMatrixDisplay.from_predictions(labels, probs.argmax(1), labels=list(range(len(classes))),
                                                display_labels=classes, normalize=normalize, ax=axis,
                                                colorbar=False, values_format="d" if normalize is None else ".2f",
                                                xticks_rotation=45, cmap="Blues")
        axis.set_title(f"{title}: {name}")
    figure.tight_layout()
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))
    plt.close(figure)


def confusion_table(matrix, classes):
    width = max(len(c) for c in classes) + 1
    lines = ["true \\ predicted".ljust(width) + "".join(c[:7].rjust(8) for c in classes)]
    lines += [c.ljust(width) + "".join(f"{v:8d}" for v in row) for c, row in zip(classes, matrix)]
    return "\n".join(lines)


def markdown_section(name, figures, classes, png):
    rows = ["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    rows += [f"| {c} | {f['precision']:.3f} | {f['recall']:.3f} | {f['f1-score']:.3f} | {f['support']:.0f} |"
             for c, f in figures["per_class"].items()]
    return "\n".join([f"## {name}", "", f"Accuracy {100 * figures['accuracy']:.2f}%, macro-F1 "
                      f"{figures['macro_f1']:.3f}; hardest classes: {', '.join(figures['hardest_classes'])}.",
                      "", *rows, "", f"![confusion matrix of {name}]({png})", ""])


def member_names(paths):
    """Short names for checkpoints: their run folder, with its parent where two would clash."""
    names = [p.parent.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.parent.name}-{p.parent.name}" for p in paths]
    return [safe_filename(n) for n in names]


def load_members(paths, device):
    checkpoints, models = [], []
    for path in paths:
        try:
            checkpoint = load_checkpoint(path)
            models.append(model_from_checkpoint(checkpoint, device).to(memory_format=torch.channels_last))
        except (ValueError, KeyError, RuntimeError) as error:
            sys.exit(f"error: cannot use checkpoint {path}: {error}")
        checkpoints.append(checkpoint)
    return checkpoints, models


def fitted_ensemble(args, paths, names, models, classes, data_source, precision):
    ensemble_path = Path(args.ensemble or Path(args.out) / "ensemble.json")
    if ensemble_path.exists() and not args.refit:
        record = ensemble.load_ensemble(ensemble_path)
        if ensemble.matches(record, paths, args.tta):
            print(f"reusing ensemble weights from {ensemble_path}")
            return record
    val = data.load_train_val(data_source)[1]
    val_images, val_labels, _ = align_classes(val, classes)
    member_probs = [predict_probs(m, val_images, args.tta, args.batch_size, precision) for m in models]
    fit = ensemble.fit_weights(member_probs, val_labels, names)
    print(f"ensemble weights fitted on {len(val_labels)} validation images ({fit['method']}): "
          + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, fit["weights"])))
    return ensemble.save_ensemble(ensemble_path, paths, classes, fit, args.tta)


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.checkpoints] if args.checkpoints else sorted(Path(args.runs).glob("**/best.pt"))
    if not paths:
        sys.exit(f"error: no checkpoints found: looked for {args.runs}/**/best.pt. "
                 "Train first (python train.py), or pass --checkpoints.")
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    checkpoints, models = load_members(paths, device)
    names = member_names(paths)
    data_source = args.data or checkpoints[0]["config"]["data"]
    try:
        split = data.load_split(data_source, args.split)
    except data.DataError as error:
        sys.exit(f"error: {error}. Choose another --split or --data.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"evaluating {len(paths)} checkpoint(s) on {data_source} [{args.split}], {len(split.labels)} images, "
          f"test-time augmentation: {args.tta}")

    report = {"data": str(data_source), "split": args.split, "tta": args.tta, "models": {}}
    sections, summary = [], []
    member_probs = []
    for name, path, checkpoint, model in zip(names, paths, checkpoints, models):
        images, labels, left_out = align_classes(split, checkpoint["classes"])
        probs = predict_probs(model, images, args.tta, args.batch_size, precision)
        member_probs.append(probs)
        figures = {"checkpoint": str(path), "left_out": left_out,
                   **classification_figures(probs, labels, checkpoint["classes"])}
        report["models"][name] = figures
        sections.append((name, figures, checkpoint["classes"], labels, probs))

    if len(models) > 1:
        class_lists = {name: c["classes"] for name, c in zip(names, checkpoints)}
        if len({tuple(c) for c in class_lists.values()}) > 1:
            sys.exit("error: the checkpoints have different class lists, so they cannot be ensembled: "
                     + "; ".join(f"{n}: {', '.join(c)}" for n, c in class_lists.items()))
        classes = checkpoints[0]["classes"]
        record = fitted_ensemble(args, paths, names, models, classes, data_source, precision)
        weights = [m["weight"] for m in record["members"]]
        probs = ensemble.weighted_average(member_probs, weights)
        figures = {"weights": dict(zip(names, weights)), "method": record["method"],
                   "val_accuracy": record["val_accuracy"], **classification_figures(probs, labels, classes)}
        report["ensemble"] = figures
        sections.append(("ensemble", figures, classes, labels, probs))

    markdown = [f"# Evaluation on {data_source} [{args.split}], test-time augmentation: {args.tta}", ""]
    for name, figures, classes, labels, probs in sections:
        png = f"confusion_{name}.png"
        save_confusion_png(out / png, labels, probs, classes, name)
        markdown.append(markdown_section(name, figures, classes, png))
        print(f"\n{name}: accuracy {100 * figures['accuracy']:.2f}%, macro-F1 {figures['macro_f1']:.3f}; "
              f"hardest classes: {', '.join(figures['hardest_classes'])}")
        print(confusion_table(figures["confusion_matrix"], classes))
        summary.append(f"{name:>12}: accuracy {100 * figures['accuracy']:6.2f}%  macro-F1 {figures['macro_f1']:.3f}")
    if "ensemble" in report:
        markdown.append("Ensemble weights: " + ", ".join(f"{n} {w:.3f}" for n, w in report["ensemble"]["weights"].items())
                        + f" ({report['ensemble']['method']}, fitted on validation).")
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", "\n".join(markdown) + "\n")
    print("\nsummary (" + f"{args.split}, tta {args.tta}):\n" + "\n".join(summary))
    print(f"wrote {out}/report.md, report.json and confusion_*.png")
    return report


if __name__ == "__main__":
    main()
