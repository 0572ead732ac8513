"""Export a fitted ensemble of training runs as the shipped weights: one safetensors file per member
(no pickle, so loading never runs code) and an ensemble.json that records each file's SHA-256, the
ensemble weights, the TTA, validation accuracies and how the members were trained.

    python evaluate.py --data ../shared/data/fer2013 --split val    # fits runs/evaluation/ensemble.json
    python export.py                                                # writes weights/

The same runs give byte-identical files. An existing weights/ensemble.json with a higher validation
accuracy is kept unless --force is given: shipped weights are replaced only by a better recipe.

    python export.py --format onnx          # weights/ensemble.onnx: the whole ensemble as one fp32 graph
    python export.py --format onnx-int8     # and weights/ensemble-int8.onnx, if int8 keeps the accuracy,
                                            # recorded in the ensemble file: predict.py runs it on a CPU

The ONNX files are described in onnx_graph.py; predict.py and evaluate.py run them with --backend onnx.
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

import data
import ensemble
from ensemble import Member
from ferkit import cli, onnx_graph
from ferkit.checkpoint import load_checkpoint
from ferkit.device import pick_device, resolve_precision
from ferkit.files import write_atomic
from ferkit.inference import MEMBER_FORMAT, METADATA_KEY, PRETRAINED, Predictor, align_classes, describe, \
    load_members, predict_probs, unique_names, weighted_members

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
FP16_TOLERANCE = 0.001  # fp16 files only if the ensemble's validation accuracy moves by at most 0.1 point
INT8_TOLERANCE = 0.005  # the int8 ONNX file only if the ensemble's validation accuracy moves by at most 0.5 point
FORMATS = ["safetensors", "onnx", "onnx-int8"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ensemble", default="runs/evaluation/ensemble.json",
                   help="ensemble.json fitted by evaluate.py on validation; its members and weights are exported")
    p.add_argument("--out", default=str(PRETRAINED.parent), help="folder for the .safetensors files and ensemble.json")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES),
                   help="storage type of the weights; fp16 halves the files and is kept only when the ensemble's "
                        "validation accuracy stays within 0.1 point of fp32's, else fp32 is written")
    p.add_argument("--data", default=None, help="data whose validation split scores the export; unset: the members' own")
    p.add_argument("--train-command", action="append", default=None,
                   help="the command that trained the members (repeat for several); unset: as recorded in them")
    p.add_argument("--train-commit", default=None, help="the commit that trained them; unset: as recorded in them")
    p.add_argument("--force", action="store_true", help="replace shipped weights even when they score higher")
    p.add_argument("--format", default="safetensors", choices=FORMATS,
                   help="safetensors: member files and ensemble.json; onnx: OUT/ensemble.onnx, the ensemble as one "
                        "fp32 graph (float32 pixels 0..255 [N, 1, 48, 48] in, probabilities out; --dtype, --force "
                        "and --train-* do not apply); onnx-int8: that and OUT/ensemble-int8.onnx, statically "
                        "quantized, written only if its validation accuracy is within 0.5 point of fp32's, and "
                        "recorded in --ensemble, so that predict.py and app.py run it on a CPU")
    cli.add_device_flags(p, batch_size=128, batch_help="validation batch size")
    return p


def member_bytes(checkpoint, dtype):
    """A checkpoint's network as safetensors bytes: floating tensors in `dtype`, the architecture and
    class list in the metadata, keys sorted so that the same checkpoint gives the same bytes."""
    tensors = {key: (value.to(dtype) if value.is_floating_point() else value).contiguous()
               for key, value in sorted(checkpoint["model"].items())}
    # One metadata entry: safetensors writes several in no fixed order, which would change the bytes.
    description = {"format": MEMBER_FORMAT, "architecture": checkpoint["model_name"],
                   "classes": list(checkpoint["classes"])}
    return safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(description, sort_keys=True)})


def training_record(checkpoints, args):
    """How the members were trained: the flags given, else what train.py recorded in each checkpoint."""
    recorded = [command for c in checkpoints for command in c["config"].get("commands", [])]
    commands = args.train_command or list(dict.fromkeys(recorded))  # each once, in training order
    commits = sorted({c["config"].get("commit") for c in checkpoints} - {None})
    return {"commands": commands, "commit": args.train_commit or (commits[0] if len(commits) == 1 else commits)}


def score(files, weights, val, tta, args, device, precision):
    """Validation accuracy of each member file and of their weighted average."""
    members = load_members([Member(path) for path in files], device)
    images, labels, _ = align_classes(val, members[0].classes)
    probs = [predict_probs(m.model, images, tta, args.batch_size, precision) for m in members]
    average = ensemble.weighted_average(probs, weights)
    return [ensemble.accuracy(p, labels) for p in probs], ensemble.accuracy(average, labels), \
        ensemble.negative_log_likelihood(average, labels)


def write_member_files(folder, names, checkpoints, dtype):
    paths = []
    for name, checkpoint in zip(names, checkpoints):
        path = Path(folder) / f"{name}.safetensors"
        content = member_bytes(checkpoint, dtype)
        write_atomic(path, lambda file: file.write(content))
        paths.append(path)
    return paths


def onnx_accuracy(path, val, tta, args):
    """Validation accuracy of an ONNX file, run as predict.py --backend onnx runs it."""
    predictor = Predictor.from_onnx(path, tta, args.batch_size, args.threads)
    images, labels, _ = align_classes(val, predictor.classes)
    return ensemble.accuracy(predictor.probabilities(images), labels)


def copy_into(path, folder):
    content = path.read_bytes()
    write_atomic(folder / path.name, lambda file: file.write(content))
    print(f"wrote {folder / path.name} ({len(content) / 1e6:.1f} MB)")
    return folder / path.name


def onnx_source(ensemble_file):
    """(the members that carry weight, loaded from checkpoints or safetensors files, in fp32 on CPU; their
    Description, with weights normalised)."""
    source = ensemble.load_ensemble(ensemble_file)
    members = load_members(weighted_members(source, ensemble_file), "cpu")
    return members, describe(members, source["tta"], source.get("method", "unknown"), "fp32")


def export_onnx(args):
    """--format onnx and onnx-int8: OUT/ensemble.onnx, and OUT/ensemble-int8.onnx where int8 keeps the
    validation accuracy within INT8_TOLERANCE of fp32's."""
    members, description = onnx_source(args.ensemble)
    data_source = args.data or members[0].data
    if data_source is None:
        raise cli.UsageError(f"{args.ensemble} names shipped files, which do not record their data: pass --data")
    train, val = data.load_train_val(data_source)
    out, tta = Path(args.out), description.tta
    out.mkdir(parents=True, exist_ok=True)
    print(f"exporting {len(members)} member(s) of {args.ensemble} to ONNX (tta {tta}), scored on the validation "
          f"split of {data_source} ({len(val.labels)} images)")
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / onnx_graph.FP32_NAME
        onnx_graph.export_fp32([m.model for m in members], description, fp32)
        fp32_accuracy = onnx_accuracy(fp32, val, tta, args)
        print(f"fp32: ensemble {100 * fp32_accuracy:.2f}% on validation")
        written.append(copy_into(fp32, out))
        if args.format == "onnx-int8":
            int8 = Path(scratch) / onnx_graph.INT8_NAME
            onnx_graph.quantize_int8(fp32, int8, onnx_graph.calibration_images(train.images), scratch)
            int8_accuracy = onnx_accuracy(int8, val, tta, args)
            print(f"int8: ensemble {100 * int8_accuracy:.2f}% on validation (fp32 {100 * fp32_accuracy:.2f}%)")
            # rounded: a difference of exactly 0.5 point must not fail on a floating-point last digit
            if round(abs(int8_accuracy - fp32_accuracy), 9) <= INT8_TOLERANCE:
                written.append(copy_into(int8, out))
                path = ensemble.relative_path(written[-1], Path(args.ensemble).parent)
                record_int8_graph(args.ensemble, {"path": path, "sha256": ensemble.file_hash(written[-1]), "tta": tta,
                                                  "val_accuracy": int8_accuracy, "fp32_val_accuracy": fp32_accuracy})
            else:
                print(f"int8 is not within {100 * INT8_TOLERANCE:.1f} point of fp32 on validation: "
                      f"{onnx_graph.INT8_NAME} not written")
    stale = out / onnx_graph.INT8_NAME
    if stale not in written:
        if stale.is_file():
            stale.unlink()  # quantized from an earlier export: it would not match the new ensemble.onnx
            print(f"removed {stale}, quantized from an earlier export")
        record_int8_graph(args.ensemble, None)
    return written


def record_int8_graph(ensemble_file, entry):
    """Name the int8 graph (entry: its path, SHA-256 and validation scores) in the ensemble file it was made
    from, so that predict.py, app.py and Predictor.pretrained() run it on a CPU (inference.Choice.graph);
    entry None takes an earlier graph's entry out."""
    record = ensemble.load_ensemble(ensemble_file)
    if record.get("int8_graph") == entry:
        return
    record.pop("int8_graph", None)
    record.update({"int8_graph": entry} if entry else {})
    ensemble.write_record(ensemble_file, record)
    print(f"recorded {entry['path']} in {ensemble_file}" if entry else f"took the int8 graph out of {ensemble_file}")


def training_checkpoints(members):
    """The members' training checkpoints: export.py makes shipped files from best.pt files, which record
    how they were trained, not from shipped files."""
    checkpoints = []
    for member in members:
        try:
            checkpoints.append(load_checkpoint(member.path))
        except ValueError as error:
            raise cli.UsageError(f"{error}. export.py takes the training checkpoints (best.pt) that "
                                 "evaluate.py fitted") from error
    return checkpoints


def chosen_dtype(args, names, checkpoints, weights, val, tta):
    """(the storage type to write, its scores): fp32 and --dtype are both written to scratch files and
    scored on validation, and --dtype is kept only within FP16_TOLERANCE of fp32's ensemble accuracy."""
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    scores = {}
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in dict.fromkeys(["fp32", args.dtype]):
            (Path(scratch) / dtype).mkdir()
            files = write_member_files(Path(scratch) / dtype, names, checkpoints, DTYPES[dtype])
            scores[dtype] = score(files, weights, val, tta, args, device, precision)
            print(f"{dtype}: members " + ", ".join(f"{n} {100 * a:.2f}%" for n, a in zip(names, scores[dtype][0]))
                  + f"; ensemble {100 * scores[dtype][1]:.2f}%")
    if abs(scores[args.dtype][1] - scores["fp32"][1]) > FP16_TOLERANCE:
        print(f"{args.dtype} changes the ensemble's validation accuracy by more than 0.1 point: writing fp32")
        return "fp32", scores["fp32"]
    return args.dtype, scores[args.dtype]


def keep_better_shipped(shipped, val_accuracy):
    """UsageError when the shipped ensemble.json scores higher on validation than the one to be written."""
    if not shipped.is_file():
        return
    try:
        current = ensemble.load_ensemble(shipped)["val_accuracy"]
    except cli.UsageError:
        return
    if current is not None and current > val_accuracy:
        raise cli.UsageError(f"{shipped} scores {100 * current:.2f}% on validation, this ensemble "
                             f"{100 * val_accuracy:.2f}%: kept. Pass --force to replace it anyway.")


def export_safetensors(args):
    """--format safetensors: the members as OUT/*.safetensors and OUT/ensemble.json."""
    source = ensemble.load_ensemble(args.ensemble)
    members, tta = weighted_members(source, args.ensemble), source["tta"]
    checkpoints = training_checkpoints(members)
    weights = np.array([m.weight for m in members]) / sum(m.weight for m in members)
    names = unique_names([m.path for m in members])
    data_source = args.data or checkpoints[0]["config"]["data"]
    val = data.load_train_val(data_source)[1]
    print(f"exporting {len(members)} member(s) of {args.ensemble} (tta {tta}), scored on the validation split of "
          f"{data_source} ({len(val.labels)} images)")
    dtype, (member_accuracies, val_accuracy, val_nll) = chosen_dtype(args, names, checkpoints, weights, val, tta)
    out = Path(args.out)
    shipped = out / "ensemble.json"
    if not args.force:
        keep_better_shipped(shipped, val_accuracy)
    out.mkdir(parents=True, exist_ok=True)
    files = write_member_files(out, names, checkpoints, DTYPES[dtype])
    for stale in set(out.glob("*.safetensors")) - set(files):
        stale.unlink()  # members of an earlier export that this ensemble does not use
    if (out / onnx_graph.INT8_NAME).is_file():
        (out / onnx_graph.INT8_NAME).unlink()  # the earlier members' graph; export.py --format onnx-int8 makes a new one
        print(f"removed {out / onnx_graph.INT8_NAME}, the graph of the members replaced")
    fit = {"method": source["method"], "weights": [round(float(w), 6) for w in weights],
           "val_accuracy": val_accuracy, "val_nll": val_nll, "candidates": source["candidates"]}
    extra = {"dtype": dtype, "data": str(data_source), "split": "val", "trained_with": training_record(checkpoints, args)}
    member_extras = [{"name": n, "architecture": c["model_name"], "classes": list(c["classes"]), "val_accuracy": a}
                     for n, c, a in zip(names, checkpoints, member_accuracies)]
    ensemble.save_ensemble(shipped, files, checkpoints[0]["classes"], fit, tta, extra, member_extras)
    size = sum(p.stat().st_size for p in [shipped, *files])
    print(f"wrote {shipped} and {len(files)} member file(s), {size / 1e6:.1f} MB in all; ensemble "
          f"{100 * val_accuracy:.2f}% on validation with tta {tta}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    return export_onnx(args) if args.format != "safetensors" else export_safetensors(args)


if __name__ == "__main__":
    cli.run(main)
