"""Predict the facial expression of every face in images: find the faces with OpenCV's Haar cascade,
crop each to 48x48 grayscale as in training, and classify it with the trained ensemble.

    python predict.py photo.jpg                     # runs/evaluation/ensemble.json, else runs/**/best.pt
    python predict.py photos/ --out annotated/ --json
    python predict.py fer_faces/ --no-detect        # already-cropped faces, one per image
"""
import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

import ensemble
from data import IMAGE_SIZE, check_pixel_limit, to_grayscale
from evaluate import TTA_CHOICES, load_members, predict_probs
from files import safe_filename, write_atomic
from models import default_threads, pick_device, resolve_precision

CASCADE = "haarcascade_frontalface_default.xml"
MARGIN = 0.12  # Haar boxes stop at the brows and chin; FER-2013 crops show a little more around them
MIN_FACE_FRACTION, MIN_FACE_PIXELS = 0.1, 24
DETECT_MAX_SIDE = 1280  # the cascade's time grows with pixels; faces this tool cares about survive it
CHUNK_IMAGES = 64  # images decoded and held at once; their faces go through the models together
SMALL_IMAGE_HINT = "; if this small image is an already-cropped face, pass --no-detect"


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="images, or folders searched recursively")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoints", nargs="+", default=None,
                        help="checkpoint files, averaged with equal weights (name the images first); unset: see --ensemble")
    source.add_argument("--ensemble", default=None,
                        help="ensemble.json written by evaluate.py; unset: runs/evaluation/ensemble.json "
                             "if it exists, else every runs/**/best.pt")
    p.add_argument("--out", default=None, help="folder for annotated copies of the images; unset: none written")
    p.add_argument("--no-detect", action="store_true", help="treat each whole image as one already-cropped face")
    p.add_argument("--top-k", type=positive_int, default=3, help="emotions listed per face")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    p.add_argument("--tta", default=None, choices=TTA_CHOICES,
                   help="test-time augmentation; unset: the ensemble's recorded one, none for --checkpoints")
    p.add_argument("--batch-size", type=positive_int, default=256, help="faces per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on CPU and recent GPUs")
    p.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="CPU threads; on a busy machine 1 is often much faster for a few faces")
    return p


def log(message):
    # Diagnostics go to stderr so that --json output on stdout stays machine-readable.
    print(message, file=sys.stderr, flush=True)


def member_path(recorded, ensemble_path):
    """evaluate.py records paths as given on its command line, often relative to where it ran:
    try them as they are, then from each folder above the ensemble file."""
    path = Path(recorded)
    candidates = [path] + ([] if path.is_absolute() else [a / path for a in Path(ensemble_path).resolve().parents])
    return next((c for c in candidates if c.is_file()), None)


def resolve_members(checkpoints=None, ensemble_file=None, runs="runs"):
    """[(checkpoint path, weight)] and the recorded TTA (None for plain checkpoints)."""
    if checkpoints:
        absent = [c for c in checkpoints if not Path(c).is_file()]
        if absent:
            sys.exit(f"error: no checkpoint file {', '.join(absent)}")
        return [(Path(c), 1 / len(checkpoints)) for c in checkpoints], None
    default = Path(runs) / "evaluation" / "ensemble.json"
    if ensemble_file is None and not default.is_file():
        found = sorted(Path(runs).glob("**/best.pt"))
        if not found:
            sys.exit(f"error: no trained models found: looked for {default} and {runs}/**/best.pt. Train first "
                     "(python train.py, then python evaluate.py for the ensemble), or pass --checkpoints.")
        return [(p, 1 / len(found)) for p in found], None
    ensemble_file = ensemble_file or default
    try:
        record = ensemble.load_ensemble(ensemble_file)
    except ValueError as error:
        sys.exit(f"error: {error}")
    members = []
    for member in record["members"]:
        if member["weight"] <= 0:
            continue  # a member the fit switched off changes nothing: not loading it saves its time
        path = member_path(member["path"], ensemble_file)
        if path is None:
            sys.exit(f"error: {ensemble_file} names checkpoint {member['path']}, which does not exist. "
                     "Re-run python evaluate.py to fit the ensemble for the checkpoints you have.")
        if ensemble.file_hash(path) != member["sha256"]:
            log(f"warning: {path} changed since {ensemble_file} was fitted; its weight may no longer suit it "
                "(python evaluate.py --refit fits it again)")
        members.append((path, member["weight"]))
    return members, record["tta"]


class Predictor:
    """The models, loaded once, and how to turn 48x48 faces into ensemble probabilities."""

    def __init__(self, members, tta="none", device="auto", precision="auto", batch_size=256):
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.tta, self.batch_size = tta, batch_size
        self.paths = [path for path, _ in members]
        checkpoints, self.models = load_members(self.paths, self.device)
        class_lists = {tuple(c["classes"]) for c in checkpoints}
        if len(class_lists) > 1:
            sys.exit("error: the checkpoints have different class lists, so they cannot be averaged: "
                     + "; ".join(f"{p}: {', '.join(c['classes'])}" for p, c in zip(self.paths, checkpoints)))
        self.classes = list(checkpoints[0]["classes"])
        weights = np.array([weight for _, weight in members], dtype=np.float64)
        self.weights = weights / weights.sum()  # zero-weight members were dropped: the rest must sum to 1

    def probabilities(self, faces):
        """faces uint8 [N, 48, 48] -> probabilities [N, C]."""
        if len(faces) == 0:
            return np.zeros((0, len(self.classes)))
        images = torch.from_numpy(np.array(faces, dtype=np.uint8)).unsqueeze(1)  # a writable copy, as torch wants
        member_probs = [predict_probs(m, images, self.tta, self.batch_size, self.precision) for m in self.models]
        return ensemble.weighted_average(member_probs, self.weights)


def load_cascade():
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
    if cascade.empty():
        sys.exit(f"error: OpenCV's {CASCADE} is missing; install opencv-python-headless>=4.8,<5 "
                 "(OpenCV 5 no longer ships Haar cascades), or pass --no-detect")
    return cascade


def detect_faces(gray, cascade):
    """Face boxes (x, y, w, h) in pixels of `gray`, left to right."""
    height, width = gray.shape
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    small = cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA) \
        if scale < 1 else gray
    smallest = max(MIN_FACE_PIXELS, round(MIN_FACE_FRACTION * min(small.shape)))
    boxes = cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    return sorted(tuple(int(round(v / scale)) for v in box) for box in boxes)


def crop_face(gray, box, margin=MARGIN):
    """The box grown by `margin` on each side (clipped to the image), as 48x48 uint8, bilinear like data.py."""
    x, y, w, h = box
    left, top = max(0, round(x - margin * w)), max(0, round(y - margin * h))
    right, bottom = min(gray.shape[1], round(x + w + margin * w)), min(gray.shape[0], round(y + h + margin * h))
    face = Image.fromarray(gray[top:bottom, left:right])
    return np.asarray(face.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def open_image(path):
    """(the image upright, its grayscale pixels as uint8 [H, W]); any decoding error propagates."""
    with Image.open(path) as image:
        check_pixel_limit(image)
        image = ImageOps.exif_transpose(image)  # phone photos are stored sideways; the cascade wants them upright
        image.load()
    return image, np.asarray(to_grayscale(image), dtype=np.uint8)


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
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(picture.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(picture.size) / 30)))
    except TypeError:  # Pillow < 10.1 has a single fixed-size default font
        font = ImageFont.load_default()
    for face in faces:
        x, y, w, h = face["box"]
        best = face["top"][0]
        label = f"{best['emotion']} {100 * best['probability']:.0f}%"
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 40, 40), width=line)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_y = y - bottom - line if y >= bottom + line else y + h  # above the box when there is room
        draw.rectangle([x, text_y, x + right - left + 2 * line, text_y + bottom + line], fill=(255, 40, 40))
        draw.text((x + line, text_y), label, fill=(255, 255, 255), font=font)
    kind = "JPEG" if path.suffix in (".jpg", ".jpeg") else "PNG"
    write_atomic(path, lambda file: picture.save(file, format=kind))


def face_record(box, probs, classes, top_k):
    order = np.argsort(-probs)[:top_k]
    return {"box": [int(v) for v in box],
            "top": [{"emotion": classes[i], "probability": round(float(probs[i]), 4)} for i in order],
            "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs)}}


def print_table(record):
    print(record["image"])
    if not record["faces"]:
        print(f"  {record['note']}")
    for number, face in enumerate(record["faces"], 1):
        box = ",".join(map(str, face["box"]))
        emotions = "  ".join(f"{t['emotion']} {100 * t['probability']:5.1f}%" for t in face["top"])
        print(f"  face {number:<3} box {box:<20} {emotions}")


def process_chunk(chunk, predictor, cascade, args, used_names):
    """Decode, detect and crop every image of the chunk, classify all its faces in one go, report."""
    decoded, crops, skipped = [], [], []
    for path, root in chunk:
        try:
            image, gray = open_image(path)
        except Exception as error:  # PIL raises many types for non-images and bad files; each is a skip
            skipped.append(f"{path} ({type(error).__name__})")
            continue
        boxes = [(0, 0, gray.shape[1], gray.shape[0])] if args.no_detect else detect_faces(gray, cascade)
        crops += [crop_face(gray, box, 0 if args.no_detect else MARGIN) for box in boxes]
        decoded.append((path, root, image if args.out else None, boxes, min(gray.shape)))
    probs, start, records = predictor.probabilities(np.array(crops).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)), 0, []
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    members, recorded_tta = resolve_members(args.checkpoints, args.ensemble)
    predictor = Predictor(members, args.tta or recorded_tta or "none", args.device, args.precision, args.batch_size)
    cascade = None if args.no_detect else load_cascade()
    out = Path(args.out).resolve() if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    files, missing = find_images(args.inputs, skip_folder=out)
    for path in missing:
        log(f"warning: {path} does not exist; skipped")
    records, skipped, used_names = [], [], set()
    for start in range(0, len(files), CHUNK_IMAGES):
        chunk_records, chunk_skipped = process_chunk(files[start:start + CHUNK_IMAGES], predictor, cascade,
                                                     args, used_names)
        records += chunk_records
        skipped += chunk_skipped
    if skipped:
        log(f"skipped {len(skipped)} file(s) that are not readable images: {', '.join(skipped[:5])}"
            + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    if not records:
        sys.exit(f"error: no readable image found in {', '.join(args.inputs)}")
    faces = sum(len(r["faces"]) for r in records)
    log(f"{len(records)} image(s), {faces} face(s); models: {', '.join(map(str, predictor.paths))}, "
        f"tta {predictor.tta}" + (f"; annotated copies in {args.out}" if args.out else ""))
    return records


if __name__ == "__main__":
    main()
