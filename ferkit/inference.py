"""Everything between trained weights and an answer, shared by predict.py, evaluate.py, export.py, app.py
and the benchmarks: loading ensemble members (training checkpoints or the shipped safetensors files),
choosing which models to use, test-time-augmentation views, batched probabilities, finding and
cropping faces, and `Predictor`, the Python API:

    from ferkit.inference import Predictor
    predictor = Predictor.pretrained()                  # the ensemble shipped in weights/ (on a CPU: its int8 graph)
    predictor.predict("photo.jpg")                      # [{"box": ..., "top": ..., "probabilities": ...}] per face
    predictor.predict_faces(face_48x48)                 # probabilities [N, classes], no detection
    Predictor.pretrained(backend="torch")               # the same ensemble run by PyTorch (--device, --precision)
    Predictor.from_onnx("weights/ensemble.onnx")        # a graph written by export.py --format onnx

A Predictor is one forward function (torch networks, or an ONNX Runtime session) with what every backend
shares around it: the TTA views, batching, detection, cropping and the answer's format.
"""
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import data
import ensemble
from data import IMAGE_SIZE, check_pixel_limit, to_grayscale
from ensemble import Description, Member
from ferkit import onnx_graph
from ferkit.checkpoint import load_checkpoint, model_from_checkpoint
from ferkit.cli import UsageError
# The detection names below stay importable from here, where their callers found them before detect.py.
from ferkit.detect import (CASCADE, DEFAULT_DETECTOR, DETECT_MAX_SIDE, DETECTORS, MARGIN,  # noqa: F401
                           MIN_FACE_FRACTION, MIN_FACE_PIXELS, Face, cascade_faces, crop_face, detect_faces,
                           face_crop, load_cascade, load_detector)
from ferkit.device import autocast, pick_device, resolve_precision
from ferkit.files import safe_filename
from models import MODELS, build_model

TTA_CHOICES, TTA_VIEWS, ONE_FACE_TTA = ensemble.TTA_CHOICES, ensemble.TTA_VIEWS, ensemble.ONE_FACE_TTA
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PRETRAINED = WEIGHTS_DIR / "ensemble.json"
METADATA_KEY = "fer_member"  # safetensors metadata entry: JSON with the format, architecture and class list
MEMBER_FORMAT = "fer-member-1"
RESTORE_HINT = "Restore the shipped files with: git checkout weights/"
MODEL_FLAGS_HINT = ("name your own models with --runs DIR (its evaluation/ensemble.json, else its **/best.pt; "
                    "python train.py makes them), --ensemble FILE or --checkpoints FILE ...")



class Choice(NamedTuple):
    """The models chosen to answer: their Members, the TTA their weights were fitted with (None where no
    ensemble file says), where they came from (for the first line a script prints), how they were
    weighted, and (path, sha256) of their int8 ONNX graph where their ensemble file records one."""
    members: list
    tta: str
    source: str
    method: str
    graph: tuple = None


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
        if ensemble.classes_problem(classes):
            raise ValueError(f"class list {classes!r}")
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{path} is not an ensemble member written by export.py ({type(error).__name__}: "
                         f"{error}). {RESTORE_HINT}") from error
    return architecture, classes, state


def load_shipped(path, sha256, device):
    """(network, classes) of a shipped safetensors file, which must match `sha256` (if given) before
    anything is read from it."""
    if sha256 is not None and ensemble.file_hash(path) != sha256:
        raise UsageError(f"{path} is not the file its ensemble.json was made with (SHA-256 differs): "
                         f"changed, truncated or replaced. {RESTORE_HINT}, or re-run export.py.")
    architecture, classes, state = load_safetensors_member(path)
    model = build_model(architecture, len(classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"{path} does not fit architecture {architecture}: {error}") from error
    return model.to(device).eval(), classes


def load_trained(path, sha256, device):
    """(network, classes, the data it was trained on) of a training checkpoint; a checkpoint that changed
    since its ensemble was fitted is used, with a warning."""
    if sha256 is not None and ensemble.file_hash(path) != sha256:
        log(f"warning: {path} changed since its ensemble was fitted; its weight may no longer suit it "
            "(python evaluate.py --refit fits it again)")
    try:
        checkpoint = load_checkpoint(path)
        model = model_from_checkpoint(checkpoint, device)
        return model, list(checkpoint["classes"]), checkpoint["config"]["data"]
    except (ValueError, KeyError, RuntimeError) as error:
        raise UsageError(f"cannot use checkpoint {path}: {error}") from error


def load_member(member, device="cpu"):
    """`member` (a Member, or the path of one file) with its network, classes and training data filled in,
    from a training checkpoint (.pt) or a shipped safetensors file."""
    member = member if isinstance(member, Member) else Member(Path(member))
    path = Path(member.path)
    if not path.is_file():
        raise UsageError(f"no model file {path}")
    if path.suffix == ".safetensors":
        model, classes = load_shipped(path, member.sha256, device)
        data_source = None  # a shipped file does not record what it was trained on
    else:
        model, classes, data_source = load_trained(path, member.sha256, device)
    return member._replace(path=path, model=model.to(memory_format=torch.channels_last), classes=classes,
                           data=data_source)


def load_members(members, device="cpu"):
    return [load_member(member, device) for member in members]


def common_classes(members):
    """The class list every loaded member shares; UsageError naming each member's list when they differ."""
    if len({tuple(m.classes) for m in members}) > 1:
        raise UsageError("the models have different class lists, so they cannot be averaged: "
                         + "; ".join(f"{m.path}: {', '.join(m.classes)}" for m in members))
    return list(members[0].classes)


def describe(members, tta, method, precision):
    """The Description of loaded members as one ensemble: weights normalised, names made unique."""
    weights = np.array([m.weight for m in members], dtype=np.float64)
    return Description(common_classes(members), weights / weights.sum(), unique_names([m.path for m in members]),
                       tta, method, precision)


def weighted_members(record, ensemble_file):
    """The Members of a loaded ensemble record that carry weight; UsageError for a member file that is missing."""
    members = [m for m in ensemble.members_of(record, ensemble_file) if m.weight > 0]
    for member in members:
        if not member.path.is_file():
            raise UsageError(f"{ensemble_file} names {member.path}, which does not exist. Re-run python evaluate.py "
                             "to fit the ensemble for the checkpoints you have.")
    return members


def recorded_graph(record, ensemble_file):
    """(path, sha256) of the int8 ONNX graph that export.py --format onnx-int8 recorded in an ensemble file, or None."""
    graph = record.get("int8_graph")
    return (Path(os.path.normpath(Path(ensemble_file).parent / graph["path"])), graph["sha256"]) if graph else None


def checked_graph(path, sha256):
    """`path`, once it is the int8 graph its ensemble file recorded; UsageError naming it otherwise."""
    if not path.is_file():
        raise UsageError(f"{path}, the int8 ONNX graph its ensemble.json names, is missing. {RESTORE_HINT}, or pass "
                         "--backend torch")
    if ensemble.file_hash(path) != sha256:
        raise UsageError(f"{path} is not the int8 ONNX graph its ensemble.json recorded (SHA-256 differs): changed, "
                         f"truncated or replaced. {RESTORE_HINT}, or re-run export.py --format onnx-int8")
    return path


def ensemble_choice(ensemble_file, source):
    record = ensemble.load_ensemble(ensemble_file)
    return Choice(weighted_members(record, ensemble_file), record["tta"], source, record.get("method", "unknown"),
                  recorded_graph(record, ensemble_file))


def resolve_backend(backend, device="auto"):
    """auto: ONNX Runtime where the models would run on the CPU (it takes one face at a time there faster than
    PyTorch: docs/results.md), else torch on the GPU."""
    if backend != "auto":
        return backend
    return "onnx" if pick_device(device).type == "cpu" else "torch"


def equal_weights(paths, source):
    return Choice([Member(Path(p), 1 / len(paths)) for p in paths], None, source, "equal")


def runs_choice(runs):
    """A training folder's models: its fitted evaluation/ensemble.json, else every **/best.pt, equally weighted."""
    fitted = Path(runs) / "evaluation" / "ensemble.json"
    if fitted.is_file():
        return ensemble_choice(fitted, str(fitted))
    trained = sorted(Path(runs).glob("**/best.pt"))
    if trained:
        return equal_weights(trained, f"{runs}/**/best.pt")
    raise UsageError(f"no trained models in {runs}: looked for {fitted} and {runs}/**/best.pt. Train first "
                     f"(python train.py --out {runs}, then python evaluate.py --runs {runs} for the ensemble)")


def choose_models(checkpoints=None, ensemble_file=None, runs=None):
    """The models named (--checkpoints, equally weighted; --ensemble; --runs: see runs_choice), else the
    ensemble shipped in weights/. A Choice."""
    if checkpoints:
        return equal_weights(checkpoints, "--checkpoints")
    if ensemble_file:
        return ensemble_choice(ensemble_file, str(ensemble_file))
    if runs:
        return runs_choice(runs)
    if PRETRAINED.is_file():
        return ensemble_choice(PRETRAINED, f"the shipped ensemble {PRETRAINED}")
    raise UsageError(f"the shipped ensemble {PRETRAINED} is missing. {RESTORE_HINT}, or {MODEL_FLAGS_HINT}")


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
    if tta == "none":
        return [images]
    if tta == "flip":
        return [images, images.flip(-1)]
    larger = TF.resize(images, [54, 54], antialias=True)  # the crops zoom in by 54/48, as training's crops do
    if tta in ("centre-3", "centre-full"):  # the centre crop and the whole image, mirrored: most of tencrop-full's
        centre = TF.center_crop(larger, [48, 48])  # gain; centre-3 leaves out the whole image unmirrored
        return [centre, centre.flip(-1), images.flip(-1)] + ([images] if tta == "centre-full" else [])
    # tencrop: Krizhevsky et al. 2012, the corners and centre of a larger image, mirrored. The crops all lose
    # the border; tencrop-full adds the whole image, mirrored too, which keeps it (docs/results.md, ablations).
    crops = list(TF.ten_crop(larger, [48, 48]))
    return crops + [images, images.flip(-1)] if tta == "tencrop-full" else crops


def torch_forward(models, weights, precision):
    """A forward function for batched_probs: float pixels 0..255 [B, 1, 48, 48] on the models' device ->
    the models' softmax outputs [B, classes], averaged with `weights`."""
    weights = [float(w) for w in weights]

    def forward(pixels):
        images = pixels.div(255).contiguous(memory_format=torch.channels_last)  # trained on [0, 1]
        with autocast(images.device, precision):
            return sum(w * torch.softmax(model(images).float(), dim=1) for model, w in zip(models, weights))
    return forward


@torch.inference_mode()
def batched_probs(forward, images, tta="none", batch_size=128, device="cpu"):
    """Probabilities [N, C] (numpy) for uint8 images [N, 1, 48, 48]: the TTA views of batch_size // views
    images at a time go through `forward` together, one pass (views stacked), and are averaged per image.
    Batch norm runs in eval mode, so an image's answer does not depend on the others in its pass."""
    per_pass = max(1, batch_size // TTA_VIEWS[tta])
    outputs = []
    for start in tqdm(range(0, len(images), per_pass), desc="predicting", unit="batch", leave=False,
                      disable=None if len(images) > 4 * batch_size else True):
        batch = images[start:start + per_pass].to(device).float()
        views = tta_views(batch, tta)
        probs = forward(torch.cat(views)).float().reshape(len(views), len(batch), -1)
        outputs.append(probs.mean(0).cpu())
    return torch.cat(outputs).numpy()


def predict_probs(model, images, tta="none", batch_size=128, precision="fp32"):
    """One network's softmax probabilities [N, C] (numpy) for uint8 images [N, 1, 48, 48]."""
    device = next(model.parameters()).device
    return batched_probs(torch_forward([model], [1.0], precision), images, tta, batch_size, device)


def onnx_cache_dir():
    """Where built ONNX graphs are kept: beside data.py's decode cache (FER_CACHE_DIR moves both)."""
    return Path(data.DEFAULT_CACHE_DIR) / "onnx"


def graph_path(members, classes):
    """The cache file of loaded members' graph, named by what decides its content: the members' files
    (by SHA-256), their weights, the classes and the graph format."""
    total = sum(m.weight for m in members)
    parts = [[m.sha256 or ensemble.file_hash(m.path), round(m.weight / total, 6)] for m in members]
    key = hashlib.sha256(json.dumps([onnx_graph.FORMAT, classes, parts]).encode()).hexdigest()[:32]
    return onnx_cache_dir() / f"{key}.onnx"


def build_graph(members, about, path):
    """Write the fp32 graph of loaded (CPU) members to `path`, atomically: no data, no scoring."""
    log(f"building the ONNX graph of {', '.join(about.members)} (first use; reused from then on): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_graph.export_fp32([m.model for m in members], about, path)


def cached_session(members, about, threads=None):
    """An ONNX Runtime session of loaded members' fp32 graph, from the cache; the graph is built there first
    where it is missing, or where the cached file cannot be read. Returns (session, the file's path)."""
    path = graph_path(members, about.classes)
    if path.is_file():
        try:
            return onnx_graph.open_session(path, threads)[0], path
        except UsageError as error:
            log(f"warning: {error}; building it again")
    build_graph(members, about, path)
    return onnx_graph.open_session(path, threads)[0], path


def whole_image_face(gray):
    """The whole grayscale image as one face, without landmarks: what detect=False (--no-detect) reads."""
    return Face((0, 0, gray.shape[1], gray.shape[0]))


def cut_face(gray, face, align=True, detect=True):
    """A face's 48x48 crop: as detect.face_crop cuts a found face; detect=False: its box (the whole image) as
    it is, with no margin."""
    return face_crop(gray, face, align) if detect else crop_face(gray, face.box, 0)


def log_graph(predictor):
    """The second line predict.py and app.py print, where the answers come from an ONNX graph."""
    if predictor.backend == "onnx":
        log(f"as the ONNX graph {predictor.files[0]} ({predictor.about.precision}), run by ONNX Runtime on CPU")


def open_image(path):
    """(the image upright, its grayscale pixels as uint8 [H, W]); any decoding error propagates."""
    with Image.open(path) as image:
        check_pixel_limit(image)
        image = ImageOps.exif_transpose(image)  # phone photos are stored sideways; the cascade wants them upright
        image.load()
    return image, np.asarray(to_grayscale(image), dtype=np.uint8)


def grayscale(image):
    """uint8 [H, W] of a path, a PIL image or a grayscale/RGB array."""
    if isinstance(image, (str, Path)):
        return open_image(image)[1]
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    return np.asarray(to_grayscale(image), dtype=np.uint8)


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
    numbered, and the face records, largest face first)."""
    faces = sorted(predictor.predict(image, detect, top_k), key=lambda face: -face["box"][2] * face["box"][3])
    return draw_faces(image, faces, numbered=True), faces


def annotated_path(out, source, root, used, suffix):
    """out/<the source's path below its input folder, '_' for each separator><suffix>, unique among `used`
    (the names taken so far, which it joins), and never the source itself."""
    stem = safe_filename(str(Path(source).relative_to(root).with_suffix("")).replace(os.sep, "_"), 70)
    name, n = stem + suffix, 1
    while name in used or (Path(out) / name).resolve() == Path(source).resolve():
        n += 1
        name = f"{stem}-{n}{suffix}"
    used.add(name)
    return Path(out) / name


class Predictor:
    """An ensemble ready to answer. `forward` turns float pixels 0..255 [B, 1, 48, 48] on `device` into
    the ensemble's probabilities [B, classes]: the torch networks (from_members) or an ONNX Runtime session
    (from_onnx, or from_members with backend="onnx"). `about` is the ensemble's Description, `files` what
    it was loaded from. Copies (copy.copy) share the loaded networks."""

    def __init__(self, forward, about, files, tta=None, batch_size=128, device="cpu", backend="torch"):
        self.forward, self.about, self.files, self.backend = forward, about, [Path(f) for f in files], backend
        self.classes = list(about.classes)
        self.tta = tta or about.tta
        self.batch_size, self.device = batch_size, torch.device(device)
        self.detector, self.align = DEFAULT_DETECTOR, True  # which detector (ferkit.detect), aligned crops
        self.detect_function = None  # loaded on the first detection

    def use_detector(self, name=DEFAULT_DETECTOR, align=True):
        """Find faces with detector `name` (one of DETECTORS) from now on; align: cut faces with landmarks
        out aligned. Loads the detector now, so that a missing model file fails before any work."""
        self.detect_function = load_detector(name)
        self.detector, self.align = name, align
        return self

    @classmethod
    def from_members(cls, members, tta="none", device="auto", precision="auto", batch_size=128, backend="torch",
                     threads=None, method="given"):
        """The ensemble of `members` (Members; those without weight are left out), run by PyTorch on
        `device` in `precision`, or with backend="onnx" as their fp32 graph on ONNX Runtime
        (cached_session), where device and precision do not apply."""
        members = [m for m in members if m.weight > 0]
        if not members:
            raise UsageError("an ensemble needs at least one member with a weight above zero")
        if resolve_backend(backend, device) == "onnx":
            return cls.as_onnx(load_members(members, "cpu"), tta, method, batch_size, threads)
        device = pick_device(device)
        precision = resolve_precision(precision, device)
        loaded = load_members(members, device)
        about = describe(loaded, tta, method, precision)
        forward = torch_forward([m.model for m in loaded], about.weights, precision)
        return cls(forward, about, [m.path for m in loaded], tta, batch_size, device)

    @classmethod
    def as_onnx(cls, members, tta="none", method="given", batch_size=128, threads=None):
        """Loaded members (on CPU) as their fp32 ONNX graph, run by ONNX Runtime: the graph comes from the
        cache, where it is built on first use (cached_session)."""
        about = describe(members, tta, method, "fp32")
        session, path = cached_session(members, about, threads)
        return cls(onnx_graph.session_forward(session), about, [path], tta, batch_size, "cpu", "onnx")

    @classmethod
    def from_choice(cls, choice, tta=None, backend="torch", device="auto", batch_size=128, threads=None, **options):
        """The models of a Choice (choose_models), with the TTA they were fitted with unless tta= is given. On
        ONNX Runtime (backend onnx, or auto on a CPU): their recorded int8 graph where there is one, checked
        against its SHA-256, else their fp32 graph (as_onnx)."""
        tta, backend = tta or choice.tta or "none", resolve_backend(backend, device)
        if backend == "onnx" and choice.graph:
            return cls.from_onnx(checked_graph(*choice.graph), tta, batch_size, threads)
        return cls.from_members(choice.members, tta, device, backend=backend, batch_size=batch_size, threads=threads,
                                method=choice.method, **options)

    @classmethod
    def from_ensemble(cls, ensemble_file, tta=None, **options):
        return cls.from_choice(choose_models(ensemble_file=ensemble_file), tta, **options)

    @classmethod
    def pretrained(cls, tta=ONE_FACE_TTA, backend="auto", **options):
        """The ensemble shipped in weights/, with the one-face TTA (tta=None: the one it was fitted with); on a CPU
        (backend auto) as its int8 graph weights/ensemble-int8.onnx on ONNX Runtime, backend="torch" for PyTorch."""
        return cls.from_ensemble(PRETRAINED, tta, backend=backend, **options)

    @classmethod
    def from_onnx(cls, path, tta=None, batch_size=128, threads=None):
        """An ensemble graph written by export.py --format onnx (or onnx-int8), run by ONNX Runtime on CPU,
        with the TTA recorded in the file unless tta= is given."""
        session, about = onnx_graph.open_session(path, threads)
        return cls(onnx_graph.session_forward(session), about, [path], tta, batch_size, "cpu", "onnx")

    def probabilities(self, images):
        """uint8 images [N, 1, 48, 48] -> the ensemble's TTA-averaged probabilities [N, classes]."""
        return batched_probs(self.forward, images, self.tta, self.batch_size, self.device)

    def predict_faces(self, faces):
        """Face crops, uint8 [48, 48] or [N, 48, 48] -> ensemble probabilities [N, classes]."""
        faces = np.asarray(faces, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        if len(faces) == 0:
            return np.zeros((0, len(self.classes)))
        return self.probabilities(torch.from_numpy(faces.copy()).unsqueeze(1))  # a writable copy, as torch wants

    def detected(self, gray, max_side=DETECT_MAX_SIDE):
        """The faces (ferkit.detect.Face: box, landmarks, score) in a grayscale image, left to right."""
        if self.detect_function is None:
            self.use_detector(self.detector, self.align)
        return self.detect_function(gray, max_side)

    def locate(self, gray, detect=True):
        """(boxes, their 48x48 crops) of the faces in a grayscale image: the first half of an answer.
        detect=False: the whole image is one face."""
        faces = self.detected(gray) if detect else [whole_image_face(gray)]
        crops = np.array([cut_face(gray, face, self.align, detect) for face in faces], dtype=np.uint8)
        return [face.box for face in faces], crops.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)

    def answer(self, located, top_k=3):
        """The second half: for each image's (boxes, crops), its faces [{"box", "top", "probabilities"}],
        all the images' faces classified together."""
        probs = iter(self.predict_faces([crop for _, crops in located for crop in crops]))
        return [[face_record(box, next(probs), self.classes, top_k) for box in boxes] for boxes, _ in located]

    def predict(self, image, detect=True, top_k=3):
        """Every face in `image` (a path, a PIL image or a grayscale/RGB array): a list of
        {"box", "top", "probabilities"}, left to right. detect=False: the whole image is one face."""
        return self.answer([self.locate(grayscale(image), detect)], top_k)[0]
