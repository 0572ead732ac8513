"""Evaluate trained checkpoints and their weighted ensemble: accuracy, macro-F1, a per-class report
and a confusion matrix (printed and as a PNG) for each, written to report.json and report.md.

    python evaluate.py                                   # every runs/**/best.pt, on its data's test split
    python evaluate.py --data ../shared/data/fer2013 --split val --tta flip
    python evaluate.py --pretrained --data ../shared/data/fer2013 --split val   # the ensemble in weights/
    python evaluate.py --backend onnx --data ../shared/data/fer2013 --split val # the runs' ensemble on ONNX Runtime
"""
import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import torch
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix, f1_score

import data
import ensemble
from ensemble import Member
from ferkit import cli, onnx_graph
from ferkit.device import pick_device, resolve_precision
from ferkit.files import write_atomic, write_text_atomic
from ferkit.inference import PRETRAINED, TTA_CHOICES, Predictor, align_classes, choose_models, common_classes, \
    load_member, load_members, log, predict_probs, unique_names, weighted_members

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoints", nargs="+", default=None,
                        help="checkpoint files to evaluate; unset: every best.pt under --runs")
    source.add_argument("--pretrained", action="store_true",
                        help=f"evaluate the shipped ensemble ({PRETRAINED}) with its own weights; needs --data")
    p.add_argument("--runs", default="runs", help="folder searched for best.pt when --checkpoints is unset (with "
                                                   "--backend onnx: its evaluation/ensemble.json first, if OUT has none)")
    p.add_argument("--data", default=None, help="data to evaluate on; unset: the data the first checkpoint was trained on")
    p.add_argument("--split", default="test", choices=list(data.SPLIT_ALIASES), help="split to report on")
    p.add_argument("--tta", default=None, choices=TTA_CHOICES,
                   help="test-time augmentation: none, flip (mirror average), centre-full (the centre crop of a "
                        "54x54 resize and the whole image, mirrored), centre-3 (those less the unmirrored whole "
                        "image: predict.py's), tencrop (corners+centre, mirrored; "
                        "ten forward passes per image), tencrop-full (those ten and the whole image, mirrored; "
                        f"twelve); unset: {ensemble.DEFAULT_TTA}, or the shipped ensemble's own with --pretrained")
    p.add_argument("--out", default="runs/evaluation", help="folder for report.json, report.md and the PNGs")
    p.add_argument("--ensemble", default=None,
                   help="ensemble.json to reuse when it matches the checkpoints (with --backend onnx: the ensemble to "
                        "score); unset: OUT/ensemble.json")
    p.add_argument("--refit", action="store_true", help="refit the ensemble weights even if a matching file exists")
    onnx_graph.add_backend_flags(p, default="torch")
    # Not larger: on CPUs, bf16 inference runs faster in small batches than in large ones (benchmarks/speed.py).
    cli.add_device_flags(p, batch_size=128, batch_help="evaluation batch size")
    return p


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


def fitted_ensemble(args, members, names, classes, data_source, precision):
    """(the weight of each member, the ensemble record): reused from an ensemble file fitted for these
    checkpoints and this TTA, else fitted on the validation split and saved."""
    ensemble_path = Path(args.ensemble or Path(args.out) / "ensemble.json")
    paths = [m.path for m in members]
    if ensemble_path.exists() and not args.refit:
        try:
            record = ensemble.load_ensemble(ensemble_path)
            if ensemble.matches(record, ensemble_path, paths, args.tta):
                print(f"reusing ensemble weights from {ensemble_path}")
                return [m.weight for m in ensemble.members_of(record, ensemble_path)], record
        except cli.UsageError as error:
            print(f"note: {error}; fitting the weights again")
    val = data.load_train_val(data_source)[1]
    val_images, val_labels, _ = align_classes(val, classes)
    member_probs = [predict_probs(m.model, val_images, args.tta, args.batch_size, precision) for m in members]
    fit = ensemble.fit_weights(member_probs, val_labels, names)
    print(f"ensemble weights fitted on {len(val_labels)} validation images ({fit['method']}): "
          + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, fit["weights"])))
    return fit["weights"], ensemble.save_ensemble(ensemble_path, paths, classes, fit, args.tta)


def chosen_members(args, device):
    """(loaded members, the shipped ensemble's record or None): --pretrained (the members that carry weight,
    checked against their hashes), --checkpoints, or every best.pt under --runs."""
    if args.pretrained:
        record = ensemble.load_ensemble(PRETRAINED)
        return load_members(weighted_members(record, PRETRAINED), device), record
    paths = [Path(p) for p in args.checkpoints] if args.checkpoints else sorted(Path(args.runs).glob("**/best.pt"))
    if not paths:
        raise cli.UsageError(f"no checkpoints found: looked for {args.runs}/**/best.pt. Train first (python "
                             "train.py), pass --checkpoints, or evaluate the shipped ensemble with --pretrained.")
    return load_members([Member(path) for path in paths], device), None


def load_split(data_source, split):
    try:
        return data.load_split(data_source, split)
    except data.DataError as error:
        raise cli.UsageError(f"{error}. Choose another --split or --data.") from error


def onnx_choice(args):
    """The models whose graph --backend onnx scores, chosen as the torch backend would: --pretrained: the
    shipped ensemble; --checkpoints: those, equally weighted; else the fitted ensemble (--ensemble, else
    OUT/ensemble.json where it exists), else --runs' models."""
    if args.pretrained:
        return choose_models(ensemble_file=PRETRAINED)
    fitted = Path(args.out) / "ensemble.json"
    return choose_models(args.checkpoints, args.ensemble or (fitted if fitted.is_file() else None), args.runs)


def onnx_predictor(args):
    """(the Predictor --backend onnx scores: the file --onnx, else the chosen models' int8 graph where their
    ensemble file records one (as predict.py runs them), else their cached fp32 graph; the data to score it
    on, None where neither --data nor the models say)."""
    named = [flag for flag, given in (("--checkpoints", args.checkpoints), ("--pretrained", args.pretrained),
                                      ("--ensemble", args.ensemble)) if given]
    onnx_graph.check_backend_flags(args.backend, args.onnx, named)
    if args.onnx:
        return Predictor.from_onnx(args.onnx, args.tta, args.batch_size, args.threads), args.data
    choice = onnx_choice(args)
    log(f"models from {choice.source}: {', '.join(str(m.path) for m in choice.members)}")
    tta = args.tta or choice.tta or ensemble.DEFAULT_TTA
    predictor = Predictor.from_choice(choice, tta, "onnx", "cpu", args.batch_size, args.threads)
    return predictor, args.data or load_member(choice.members[0]).data


def evaluate_onnx(args):
    """--backend onnx: the ensemble's graph on the split, as report["ensemble"]."""
    predictor, data_source = onnx_predictor(args)
    if data_source is None:
        raise cli.UsageError("--backend onnx: pass --data with the images to score the ONNX ensemble on")
    args.tta, split, about = predictor.tta, load_split(data_source, args.split), predictor.about
    print(f"evaluating the ONNX ensemble {predictor.files[0]} ({about.precision}) on {data_source} [{args.split}], "
          f"{len(split.labels)} images, test-time augmentation: {args.tta}")
    images, labels, left_out = align_classes(split, predictor.classes)
    probs = predictor.probabilities(images)
    figures = {"onnx": str(predictor.files[0]), "precision": about.precision, "method": about.method,
               "weights": dict(zip(about.members, about.weights.tolist())), "evaluated": len(labels),
               "left_out": left_out, **classification_figures(probs, labels, predictor.classes)}
    report = {"data": str(data_source), "split": args.split, "tta": args.tta, "backend": "onnx", "models": {},
              "ensemble": figures}
    return write_report(args, data_source, report, [("ensemble", figures, predictor.classes, labels, probs)])


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backend == "onnx":
        return evaluate_onnx(args)
    onnx_graph.check_backend_flags(args.backend, args.onnx, [])
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    members, shipped = chosen_members(args, device)
    args.tta = args.tta or (shipped["tta"] if shipped else ensemble.DEFAULT_TTA)
    names = unique_names([m.path for m in members])
    data_source = args.data or members[0].data
    if data_source is None:
        raise cli.UsageError("--pretrained: pass --data with the images to score the shipped ensemble on")
    split = load_split(data_source, args.split)
    print(f"evaluating {len(members)} model(s) on {data_source} [{args.split}], {len(split.labels)} images, "
          f"test-time augmentation: {args.tta}")
    report = {"data": str(data_source), "split": args.split, "tta": args.tta, "models": {}}
    sections, member_probs = [], []
    for name, member in zip(names, members):
        images, labels, left_out = align_classes(split, member.classes)
        probs = predict_probs(member.model, images, args.tta, args.batch_size, precision)
        member_probs.append(probs)
        figures = {"checkpoint": str(member.path), "evaluated": len(labels), "left_out": left_out,
                   **classification_figures(probs, labels, member.classes)}
        report["models"][name] = figures
        sections.append((name, figures, member.classes, labels, probs))
    if len(members) > 1:
        classes = common_classes(members)
        weights, record = ([m.weight for m in members], shipped) if shipped else \
            fitted_ensemble(args, members, names, classes, data_source, precision)
        probs = ensemble.weighted_average(member_probs, weights)
        figures = {"weights": dict(zip(names, weights)), "method": record["method"],
                   "val_accuracy": record["val_accuracy"], "evaluated": len(labels), "left_out": left_out,
                   **classification_figures(probs, labels, classes)}
        report["ensemble"] = figures
        sections.append(("ensemble", figures, classes, labels, probs))
    return write_report(args, data_source, report, sections)


def write_report(args, data_source, report, sections):
    """Print each section and write report.json, report.md and a confusion PNG per section to --out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
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
    cli.run(main)
