"""Predict the facial expression of every face in images: find the faces with OpenCV's Haar cascade,
crop each to 48x48 grayscale as in training, and classify it with the trained ensemble.

    python predict.py photo.jpg                     # your trained models, else the ensemble shipped in weights/
    python predict.py photos/ --out annotated/ --json
    python predict.py fer_faces/ --no-detect        # already-cropped faces, one per image
    python predict.py photo.jpg --backend onnx      # weights/ensemble.onnx (export.py --format onnx), ONNX Runtime
    python predict.py clip.mp4 --out annotated/ --json   # videos and --camera N: see video.py
"""
import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from ferkit import cli
from ferkit import video
from data import IMAGE_SIZE
from ferkit.files import safe_filename, write_atomic
from ferkit.inference import MARGIN, MIN_FACE_PIXELS, PRETRAINED_ONNX, TTA_CHOICES, Predictor, choose_models, crop_face, \
    draw_faces, face_record, log, open_image

CHUNK_IMAGES = 64  # images decoded and held at once; their faces go through the models together
SMALL_IMAGE_HINT = "; if this small image is an already-cropped face, pass --no-detect"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="images, videos (by extension: .mp4 .avi .mkv .webm .mov ...), or folders searched recursively")
    cli.add_model_flags(p)
    p.add_argument("--out", default=None, help="folder for annotated copies of the images; unset: none written")
    p.add_argument("--no-detect", action="store_true", help="treat each whole image as one already-cropped face")
    p.add_argument("--top-k", type=cli.positive(int), default=3, help="emotions listed per face")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    p.add_argument("--tta", default=None, choices=TTA_CHOICES,
                   help="test-time augmentation; unset: the ensemble's recorded one, none for --checkpoints")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch: the models chosen by --checkpoints/--ensemble; onnx: the single-file ensemble --onnx, "
                        "run by ONNX Runtime on CPU (--device and --precision apply to torch only)")
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help=f"ONNX file for --backend onnx, written by export.py --format onnx (or onnx-int8); "
                        f"unset: {PRETRAINED_ONNX}")
    cli.add_device_flags(p, batch_size=256, batch_help="faces per forward pass")
    video.add_video_flags(p)
    return p


def find_images(inputs, skip_folder=None):
    """Candidate files in command-line order, folders walked recursively and sorted; missing paths."""
    files, missing = [], []
    for given in map(Path, inputs):
        if given.is_dir():
            for folder, subfolders, names in os.walk(given):
                # Hidden entries are skipped as data.py skips them; so is the output folder, or a second
                # run would predict on its own annotated copies.
                subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                                       and (Path(folder) / d).resolve() != skip_folder)
                files += [(Path(folder) / n, given) for n in sorted(names) if not n.startswith(".")]
        elif given.exists():
            files.append((given, given.parent))
        else:
            missing.append(str(given))
    return files, missing


def annotated_name(path, root, used):
    """A unique file name from the image's path below its input folder, with no path separators."""
    stem = safe_filename(str(path.relative_to(root).with_suffix("")).replace(os.sep, "_"), 70)
    suffix = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    name, n = stem + suffix, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}{suffix}"
    used.add(name)
    return name


def save_annotated(path, image, faces):
    picture = draw_faces(image, faces)
    kind = "JPEG" if path.suffix in (".jpg", ".jpeg") else "PNG"
    write_atomic(path, lambda file: picture.save(file, format=kind))


def print_table(record):
    print(record["image"])
    if not record["faces"]:
        print(f"  {record['note']}")
    for number, face in enumerate(record["faces"], 1):
        box = ",".join(map(str, face["box"]))
        emotions = "  ".join(f"{t['emotion']} {100 * t['probability']:5.1f}%" for t in face["top"])
        print(f"  face {number:<3} box {box:<20} {emotions}")


def process_chunk(chunk, predictor, args, used_names):
    """Decode, detect and crop every image of the chunk, classify all its faces in one go, report."""
    decoded, crops, skipped = [], [], []
    for path, root in chunk:
        try:
            image, gray = open_image(path)
        except Exception as error:  # PIL raises many types for non-images and bad files; each is a skip
            skipped.append(f"{path} ({type(error).__name__})")
            continue
        boxes = [(0, 0, gray.shape[1], gray.shape[0])] if args.no_detect else predictor.find_faces(gray)
        crops += [crop_face(gray, box, 0 if args.no_detect else MARGIN) for box in boxes]
        decoded.append((path, root, image if args.out else None, boxes, min(gray.shape)))
    probs, start, records = predictor.predict_faces(np.array(crops).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)), 0, []
    for path, root, image, boxes, side in decoded:
        faces = [face_record(box, p, predictor.classes, args.top_k) for box, p in zip(boxes, probs[start:])]
        start += len(boxes)
        record = {"image": str(path), "faces": faces}
        if not faces:
            record["note"] = "no face found" + (SMALL_IMAGE_HINT if side < 4 * MIN_FACE_PIXELS else "")
        if args.out:
            record["annotated"] = str(Path(args.out) / annotated_name(path, root, used_names))
            save_annotated(Path(record["annotated"]), image, faces)
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print_table(record)
        records.append(record)
    return records, skipped


def make_predictor(args):
    """The Predictor for --backend: torch models from choose_models, or the ONNX file's graph."""
    if args.backend == "onnx":
        if args.checkpoints or args.ensemble:
            raise cli.UsageError("--backend onnx runs one ONNX file (--onnx); --checkpoints and --ensemble name "
                                 "torch models: leave them out, or export them with python export.py --format onnx")
        predictor = Predictor.from_onnx(args.onnx or PRETRAINED_ONNX, args.tta, args.batch_size, args.threads)
        log(f"ONNX ensemble {predictor.path} ({', '.join(predictor.member_names)}; {predictor.precision}, "
            f"ONNX Runtime CPU); tta {predictor.tta}")
        return predictor
    if args.onnx:
        raise cli.UsageError(f"--onnx {args.onnx} is used by --backend onnx: add --backend onnx")
    members, recorded_tta, source = choose_models(args.checkpoints, args.ensemble)
    predictor = Predictor(members, args.tta or recorded_tta or "none", args.device, args.precision, args.batch_size)
    log(f"models from {source}: {', '.join(map(str, predictor.paths))}; tta {predictor.tta}")
    return predictor


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs and args.camera is None:
        parser.error("give images, videos or folders, or --camera N")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    predictor = make_predictor(args)
    if not args.no_detect:
        predictor.find_faces(np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))  # a missing cascade fails now
    out = Path(args.out).resolve() if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    files, missing = find_images(args.inputs, skip_folder=out)
    for path in missing:
        log(f"warning: {path} does not exist; skipped")
    videos = [(path, root) for path, root in files if video.is_video(path)]
    files = [(path, root) for path, root in files if not video.is_video(path)]
    records, skipped, used_names = [], [], set()
    for start in range(0, len(files), CHUNK_IMAGES):
        chunk_records, chunk_skipped = process_chunk(files[start:start + CHUNK_IMAGES], predictor, args, used_names)
        records += chunk_records
        skipped += chunk_skipped
    if skipped:
        log(f"skipped {len(skipped)} file(s) that are not readable images: {', '.join(skipped[:5])}"
            + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    streams = video.run_all(videos, args.camera, predictor, args, used_names)
    if not records and not streams:
        raise cli.UsageError(f"no readable image or video found in {', '.join(args.inputs)}")
    if records:
        faces = sum(len(r["faces"]) for r in records)
        log(f"{len(records)} image(s), {faces} face(s)" + (f"; annotated copies in {args.out}" if args.out else ""))
    return records + streams


if __name__ == "__main__":
    cli.run(main)
