"""Everything between trained weights and an answer, shared by predict.py, evaluate.py, export.py and
the benchmarks: loading ensemble members (training checkpoints or the shipped safetensors files),
choosing which models to use, test-time-augmentation views, batched probabilities, finding and
cropping faces, and `Predictor`, the Python API:

    from ferkit.inference import Predictor
    predictor = Predictor.pretrained()          # the ensemble shipped in weights/
    predictor.predict("photo.jpg")              # [{"box": ..., "top": ..., "probabilities": ...}] per face
    predictor.predict_faces(face_48x48)         # probabilities [N, classes], no detection
    Predictor.from_onnx("weights/ensemble.onnx") # the same, run by ONNX Runtime (onnx_graph.py)
"""
import json
import sys
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import ensemble
from ferkit.cli import UsageError
from data import IMAGE_SIZE, check_pixel_limit, to_grayscale
from ferkit.files import safe_filename
from ferkit.checkpoint import load_checkpoint, model_from_checkpoint
from ferkit.device import autocast, pick_device, resolve_precision
from models import MODELS, build_model

TTA_CHOICES = ensemble.TTA_CHOICES
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PRETRAINED = WEIGHTS_DIR / "ensemble.json"
PRETRAINED_ONNX = WEIGHTS_DIR / "ensemble.onnx"  # export.py --format onnx; run by Predictor.from_onnx
METADATA_KEY = "fer_member"  # safetensors metadata entry: JSON with the format, architecture and class list
MEMBER_FORMAT = "fer-member-1"
RESTORE_HINT = "Restore the shipped files with: git checkout weights/"

CASCADE = "haarcascade_frontalface_default.xml"
MARGIN = 0.12  # Haar boxes stop at the brows and chin; FER-2013 crops show a little more around them
MIN_FACE_FRACTION, MIN_FACE_PIXELS = 0.1, 24
DETECT_MAX_SIDE = 1280  # the cascade's time grows with pixels; faces this tool cares about survive it


class Member(NamedTuple):
    """One loaded network of an ensemble."""
    name: str
    path: Path
    classes: list
    model: torch.nn.Module
    data: str  # what it was trained on (None for shipped weights): evaluate.py's default --data


def log(message):
    # Diagnostics go to stderr so that machine-readable output on stdout stays clean.
    print(message, file=sys.stderr, flush=True)


def member_name(path):
    """A checkpoint is named by its run's folder (runs/model_x/best.pt: model_x), a shipped file by its stem."""
    path = Path(path)
    return path.stem if path.suffix == ".safetensors" else path.parent.name


def unique_names(paths):
    """Member names for reports and exported files. Where two would clash, the file's stem is added (two
    snapshots of one run: model_y-snapshot_1), or else the folder above the run's (fer7-model_y), or both."""
    paths = [Path(p) for p in paths]
    plain = [member_name(p) for p in paths]
    with_stem = [f"{n}-{p.stem}" for p, n in zip(paths, plain)]
    with_folder = [f"{p.parent.parent.name}-{n}" for p, n in zip(paths, plain)]
    with_both = [f"{p.parent.parent.name}-{n}" for p, n in zip(paths, with_stem)]
    names = next((names for names in (plain, with_stem, with_folder) if len(set(names)) == len(names)), with_both)
    return [safe_filename(n) for n in names]


def load_safetensors_member(path):
    """(architecture, classes, state dict) of a member file written by export.py; UsageError otherwise.
    safetensors holds tensors and strings only, so loading it never runs code."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            state = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"cannot read {path}: {error}. {RESTORE_HINT}") from error
    try:
        description = json.loads(metadata[METADATA_KEY])
        architecture, classes = description["architecture"], description["classes"]
        if description["format"] != MEMBER_FORMAT or architecture not in MODELS:
            raise ValueError(f"format {description['format']!r}, architecture {architecture!r}")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"class list {classes!r}")
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{path} is not an ensemble member written by export.py ({type(error).__name__}: "
                         f"{error}). {RESTORE_HINT}") from error
    return architecture, classes, state


def load_member(path, device="cpu", sha256=None):
    """A Member from a training checkpoint (.pt) or a shipped safetensors file. With `sha256`, a
    safetensors file must match it before anything is read from it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no model file {path}")
    if path.suffix == ".safetensors":
        if sha256 is not None and ensemble.file_hash(path) != sha256:
            raise UsageError(f"{path} is not the file its ensemble.json was made with (SHA-256 differs): "
                             f"changed, truncated or replaced. {RESTORE_HINT}, or re-run export.py.")
        architecture, classes, state = load_safetensors_member(path)
        model = build_model(architecture, len(classes))
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise UsageError(f"{path} does not fit architecture {architecture}: {error}") from error
        model, data_source = model.to(device).eval(), None
    else:
        if sha256 is not None and ensemble.file_hash(path) != sha256:
            log(f"warning: {path} changed since its ensemble was fitted; its weight may no longer suit it "
                "(python evaluate.py --refit fits it again)")
        try:
            checkpoint = load_checkpoint(path)
            model = model_from_checkpoint(checkpoint, device)
            classes, data_source = list(checkpoint["classes"]), checkpoint["config"]["data"]
        except (ValueError, KeyError, RuntimeError) as error:
            raise UsageError(f"cannot use checkpoint {path}: {error}") from error
    return Member(member_name(path), path, classes, model.to(memory_format=torch.channels_last), data_source)


def load_members(paths, device="cpu", hashes=None):
    hashes = hashes or [None] * len(paths)
    return [load_member(path, device, sha256) for path, sha256 in zip(paths, hashes)]


def common_classes(members):
    """The class list every member shares; UsageError naming each member's list when they differ."""
    if len({tuple(m.classes) for m in members}) > 1:
        raise UsageError("the models have different class lists, so they cannot be averaged: "
                         + "; ".join(f"{m.path}: {', '.join(m.classes)}" for m in members))
    return list(members[0].classes)


def ensemble_members(ensemble_file):
    """[(path, weight, sha256)] of an ensemble file's members that carry weight, and the TTA it was fitted with."""
    record = ensemble.load_ensemble(ensemble_file)
    return members_of(record, ensemble_file), record["tta"]


def members_of(record, ensemble_file):
    """[(path, weight, sha256)] of a loaded ensemble record's members that carry weight, with paths resolved
    against its file's folder; UsageError for a member file that is missing."""
    folder = Path(ensemble_file).parent
    members = [(folder / m["path"], m["weight"], m["sha256"]) for m in record["members"] if m["weight"] > 0]
    for path, _, _ in members:
        if not path.is_file():
            raise UsageError(f"{ensemble_file} names {path}, which does not exist. Re-run python evaluate.py to "
                             "fit the ensemble for the checkpoints you have.")
    return members


def choose_models(checkpoints=None, ensemble_file=None, runs="runs"):
    """The models to use, in this order: the ones named; runs/evaluation/ensemble.json; every
    runs/**/best.pt, equally weighted; the ensemble shipped in weights/.
    Returns ([(path, weight, sha256 or None)], the recorded TTA or None, where they came from)."""
    if checkpoints:
        return [(Path(c), 1 / len(checkpoints), None) for c in checkpoints], None, "--checkpoints"
    if ensemble_file:
        return (*ensemble_members(ensemble_file), str(ensemble_file))
    fitted = Path(runs) / "evaluation" / "ensemble.json"
    if fitted.is_file():
        return (*ensemble_members(fitted), str(fitted))
    trained = sorted(Path(runs).glob("**/best.pt"))
    if trained:
        return [(p, 1 / len(trained), None) for p in trained], None, f"{runs}/**/best.pt"
    if PRETRAINED.is_file():
        return (*ensemble_members(PRETRAINED), f"the shipped ensemble {PRETRAINED}")
    raise UsageError(f"no trained models found: looked for {fitted}, {runs}/**/best.pt and {PRETRAINED}. Train "
                     "first (python train.py, then python evaluate.py for the ensemble), pass --checkpoints, or "
                     "restore the shipped weights with: git checkout weights/")


def align_classes(split, model_classes):
    """Images of classes the model knows, with labels re-indexed to the model's class list."""
    to_model = {i: model_classes.index(c) for i, c in enumerate(split.classes) if c in model_classes}
    keep = np.array([int(label) in to_model for label in split.labels])
    unknown = sorted(set(split.classes) - set(model_classes))
    if unknown:
        print(f"note: the model knows no class {', '.join(unknown)}: left out {int((~keep).sum())} of "
              f"{len(keep)} images")
    if not keep.any():
        raise UsageError(f"none of the data's classes ({', '.join(split.classes)}) is known to the model "
                             f"({', '.join(model_classes)}); evaluate it on data with those classes.")
    labels = np.array([to_model[int(label)] for label in split.labels[keep]], dtype=np.int64)
    return split.images[torch.from_numpy(keep)], labels, int((~keep).sum())


def tta_views(images, tta):
    """The views whose softmax outputs are averaged; images are float [B, 1, 48, 48]."""
    if tta == "flip":
        return [images, images.flip(-1)]
    if tta in ("tencrop", "tencrop-full"):  # Krizhevsky et al. 2012: corners and centre of a larger image, mirrored
        larger = TF.resize(images, [54, 54], antialias=True)
        crops = list(TF.ten_crop(larger, [48, 48]))
        # The crops all lose the border; the whole image, mirrored too, keeps it (docs/results.md, ablations).
        return crops + [images, images.flip(-1)] if tta == "tencrop-full" else crops
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


def load_cascade():
    """OpenCV's frontal-face Haar cascade; UsageError naming the fix where this OpenCV has none (OpenCV 5
    dropped the cascades, and some builds leave out the object-detection module altogether)."""
    fix = (f"install opencv-python-headless>=4.8,<5 (this is OpenCV {cv2.__version__}; OpenCV 5 no longer ships "
           "Haar cascades), or pass --no-detect")
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise UsageError(f"this OpenCV build cannot detect faces (it has no CascadeClassifier): {fix}")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
    if cascade.empty():
        raise UsageError(f"OpenCV's {CASCADE} is missing: {fix}")
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


def face_record(box, probs, classes, top_k=3):
    order = np.argsort(-probs)[:top_k]
    return {"box": [int(v) for v in box],
            "top": [{"emotion": classes[i], "probability": round(float(probs[i]), 4)} for i in order],
            "probabilities": {c: round(float(p), 4) for c, p in zip(classes, probs)}}


def draw_faces(image, faces, numbered=False):
    """An RGB copy of `image` with each face's box and top emotion; numbered: '1 ', '2 ' ... in list order."""
    picture = image.convert("RGB")
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(picture.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, round(min(picture.size) / 30)))
    except TypeError:  # Pillow < 10.1 has a single fixed-size default font
        font = ImageFont.load_default()
    for number, face in enumerate(faces, 1):
        x, y, w, h = face["box"]
        best = face["top"][0]
        label = (f"{number} " if numbered else "") + f"{best['emotion']} {100 * best['probability']:.0f}%"
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 40, 40), width=line)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_y = y - bottom - line if y >= bottom + line else y + h  # above the box when there is room
        draw.rectangle([x, text_y, x + right - left + 2 * line, text_y + bottom + line], fill=(255, 40, 40))
        draw.text((x + line, text_y), label, fill=(255, 255, 255), font=font)
    return picture


def annotate(predictor, image, detect=True, top_k=3):
    """One image's answer as the browser demo (app.py) shows it: (the image with every face drawn on it,
    numbered, and the face records, largest face first). Predictor.predict does per image what predict.py's
    process_chunk does in batches; draw_faces draws what its save_annotated writes."""
    faces = sorted(predictor.predict(image, detect, top_k), key=lambda face: -face["box"][2] * face["box"][3])
    return draw_faces(image, faces, numbered=True), faces


class Predictor:
    """The ensemble's networks, loaded once, and how to turn images or 48x48 faces into probabilities."""
    backend = "torch"

    def __init__(self, members, tta="none", device="auto", precision="auto", batch_size=128):
        """`members`: [(path, weight)] or [(path, weight, sha256)]; zero-weight members are skipped."""
        members = [(*m, None)[:3] for m in members if m[1] > 0]
        if not members:
            raise UsageError("an ensemble needs at least one member with a weight above zero")
        self.device = pick_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.tta, self.batch_size = tta, batch_size
        self.members = load_members([p for p, _, _ in members], self.device, [h for _, _, h in members])
        self.classes = common_classes(self.members)
        weights = np.array([w for _, w, _ in members], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.cascade = None  # loaded on the first detection

    @classmethod
    def pretrained(cls, **options):
        """The ensemble shipped in weights/, with the TTA it was fitted with (unless tta= is given)."""
        return cls.from_ensemble(PRETRAINED, **options)

    @classmethod
    def from_ensemble(cls, ensemble_file, tta=None, **options):
        members, recorded_tta = ensemble_members(ensemble_file)
        return cls(members, tta or recorded_tta, **options)

    @classmethod
    def from_onnx(cls, path=PRETRAINED_ONNX, tta=None, batch_size=128, threads=None):
        """The ensemble graph written by export.py --format onnx, run by ONNX Runtime on CPU, with the TTA
        recorded in the file unless tta= is given."""
        from ferkit.onnx_graph import OnnxPredictor  # imported here: it imports this module
        return OnnxPredictor(path, tta, batch_size, threads)

    @property
    def paths(self):
        return [m.path for m in self.members]

    def predict_faces(self, faces):
        """Face crops, uint8 [48, 48] or [N, 48, 48] -> ensemble probabilities [N, classes]."""
        faces = np.asarray(faces, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        if len(faces) == 0:
            return np.zeros((0, len(self.classes)))
        images = torch.from_numpy(faces.copy()).unsqueeze(1)  # a writable copy, as torch wants
        return self.probabilities(images)

    def probabilities(self, images):
        """uint8 images [N, 1, 48, 48] -> the members' TTA-averaged probabilities, weighted [N, classes]."""
        member_probs = [predict_probs(m.model, images, self.tta, self.batch_size, self.precision)
                        for m in self.members]
        return ensemble.weighted_average(member_probs, self.weights)

    def find_faces(self, gray):
        if self.cascade is None:
            self.cascade = load_cascade()
        return detect_faces(gray, self.cascade)

    def predict(self, image, detect=True, top_k=3):
        """Every face in `image` (a path, a PIL image or a grayscale/RGB array): a list of
        {"box", "top", "probabilities"}, left to right. detect=False: the whole image is one face."""
        if isinstance(image, (str, Path)):
            image = open_image(image)[0]
        gray = np.asarray(to_grayscale(image) if isinstance(image, Image.Image)
                          else to_grayscale(Image.fromarray(np.asarray(image))), dtype=np.uint8)
        boxes = self.find_faces(gray) if detect else [(0, 0, gray.shape[1], gray.shape[0])]
        probs = self.predict_faces([crop_face(gray, box, MARGIN if detect else 0) for box in boxes])
        return [face_record(box, p, self.classes, top_k) for box, p in zip(boxes, probs)]
