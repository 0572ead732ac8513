"""A weighted average of several models' softmax probabilities, with weights fitted on validation.

The weights are non-negative and sum to one. Candidates: each member alone, equal weights, weights
proportional to validation accuracy, and the weights that minimise validation negative
log-likelihood over the simplex. The candidate with the best validation accuracy wins (ties go to the
lower likelihood loss), so the ensemble is never below its best member on validation. Fitting never
sees the test split.

Also what every format that names an ensemble shares: its `Member` type, the `Description` an ensemble
gives of itself, and the one check of a class list for ensemble.json, the shipped safetensors members and
the ONNX files.
"""
import hashlib
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.optimize import minimize

from ferkit.cli import UsageError
from ferkit.files import write_text_atomic

# The test-time augmentations inference.tta_views knows, with how many views each averages; an ensemble.json
# records the one it was fitted with.
TTA_VIEWS = {"none": 1, "flip": 2, "centre-3": 3, "centre-full": 4, "tencrop": 10, "tencrop-full": 12}
TTA_CHOICES = list(TTA_VIEWS)
# evaluate.py's when --tta is unset: the best on validation for every budget's ensemble (docs/results.md).
DEFAULT_TTA = "tencrop-full"
# predict.py's, app.py's and Predictor.pretrained()'s, where faces come one at a time: three views, within
# noise of centre-full's four on validation and on photos (docs/results.md, "One face at a time").
ONE_FACE_TTA = "centre-3"

VERSION = 2  # 2: member paths relative to the ensemble file's folder


class Member(NamedTuple):
    """One member of an ensemble, wherever it is named (ensemble.json, --checkpoints, an ONNX export): its
    file (a training checkpoint or a shipped safetensors file), its weight, and the file's SHA-256 where an
    ensemble file records it. inference.load_member fills in the rest: the network, its class list, and
    the data it was trained on (None for shipped files)."""
    path: Path
    weight: float = 1.0
    sha256: str = None
    model: object = None
    classes: list = None
    data: str = None


class Description(NamedTuple):
    """What an ensemble says about itself: in an ONNX file's metadata, and in every Predictor."""
    classes: list
    weights: np.ndarray  # normalised to sum to one
    members: list  # the members' names (inference.unique_names)
    tta: str  # the test-time augmentation the weights were fitted with
    method: str  # how the weights were chosen
    precision: str


def classes_problem(classes):
    """What makes `classes` not a class list of a shipped format (ensemble.json, a safetensors member, an
    ONNX file), or None: it must be a non-empty list of distinct names."""
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        return f"the class list must be a non-empty list of distinct names, not {classes!r}"
    return None


def is_weight(value):
    """A member's weight: a finite number >= 0. bool is an int to Python, but not a weight; NaN fails the
    comparison."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < math.inf


def weighted_average(member_probs, weights):
    """member_probs [M, N, C], weights [M] -> probabilities [N, C]."""
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.asarray(member_probs, dtype=np.float64), axes=1)


def negative_log_likelihood(probs, labels):
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def accuracy(probs, labels):
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def minimum_nll_weights(member_probs, labels):
    """The simplex weights that minimise validation NLL (a smooth convex problem: SLSQP solves it)."""
    count = len(member_probs)
    result = minimize(lambda w: negative_log_likelihood(weighted_average(member_probs, w), labels),
                      np.full(count, 1 / count), method="SLSQP", bounds=[(0, 1)] * count,
                      constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1}])
    weights = np.clip(result.x, 0, None)
    return weights / weights.sum()


def candidate_weights(member_probs, labels, names):
    count = len(member_probs)
    candidates = {f"{name} alone": np.eye(count)[i] for i, name in enumerate(names)}
    if count > 1:
        accuracies = np.array([accuracy(p, labels) for p in member_probs])
        candidates["equal"] = np.full(count, 1 / count)
        candidates["proportional to validation accuracy"] = accuracies / accuracies.sum()
        candidates["minimum validation NLL"] = minimum_nll_weights(member_probs, labels)
    return candidates


def fit_weights(member_probs, labels, names):
    """Score every candidate on validation; return the winner and all scores."""
    scored = {}
    for method, weights in candidate_weights(member_probs, labels, names).items():
        probs = weighted_average(member_probs, weights)
        scored[method] = {"weights": [round(float(w), 6) for w in weights],
                          "val_accuracy": accuracy(probs, labels), "val_nll": negative_log_likelihood(probs, labels)}
    method = max(scored, key=lambda m: (scored[m]["val_accuracy"], -scored[m]["val_nll"]))
    return {"method": method, **scored[method], "candidates": scored}


def file_hash(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_path(path, folder):
    """`path` as seen from `folder`, with forward slashes, so an ensemble file moves with its members."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def save_ensemble(path, member_paths, classes, fit, tta, extra=None, member_extras=None):
    """Write the fitted ensemble; member paths are stored relative to the file's folder. `extra` and
    `member_extras`: further fields for the file and for each member (export.py describes the members)."""
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    member_extras = member_extras or [{} for _ in member_paths]
    record = {"version": VERSION, "classes": list(classes), "tta": tta,
              "members": [{"path": relative_path(p, folder), "sha256": file_hash(p), "weight": w, **more}
                          for p, w, more in zip(member_paths, fit["weights"], member_extras)],
              "method": fit["method"], "val_accuracy": fit["val_accuracy"], "val_nll": fit["val_nll"],
              "candidates": fit["candidates"], **(extra or {})}
    write_record(path, record)
    return record


def write_record(path, record):
    write_text_atomic(path, json.dumps(record, indent=2))


def record_problem(record):
    """What makes `record` not an ensemble record of this version, or None."""
    if not isinstance(record, dict):
        return "expected a JSON object"
    if record.get("version") != VERSION:
        return f"version {record.get('version')!r}, expected {VERSION}"
    members = record.get("members")
    if classes_problem(record.get("classes")):
        return '"classes" must be a non-empty list of distinct names'
    if record.get("tta") not in TTA_CHOICES:
        return '"tta" must be one of ' + ", ".join(f'"{choice}"' for choice in TTA_CHOICES)
    if not (isinstance(members, list) and members and all(isinstance(m, dict) for m in members)):
        return '"members" must be a non-empty list of objects'
    for number, member in enumerate(members, start=1):
        sha256, weight = member.get("sha256"), member.get("weight")
        if not isinstance(member.get("path"), str):
            return f'member {number}: "path" must be a string'
        if not is_sha256(sha256):
            return f'member {number}: "sha256" must be 64 lowercase hex digits, as file_hash writes them'
        if not is_weight(weight):
            return f'member {number}: "weight" must be a finite number >= 0, not {weight!r}'
    if not any(member["weight"] > 0 for member in members):
        return "every member has weight 0"
    graph = record.get("int8_graph")
    if graph is not None and not (isinstance(graph, dict) and isinstance(graph.get("path"), str)
                                  and is_sha256(graph.get("sha256"))):
        return '"int8_graph" must be an object with a "path" string and a "sha256" of 64 lowercase hex digits'
    return None


def is_sha256(value):
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")


def load_ensemble(path):
    """The saved ensemble as a dict; UsageError naming the file when it is not a valid ensemble record of
    this version. Every field that callers use is checked here, so that they can index the record freely."""
    try:
        record = json.loads(Path(path).read_bytes())  # from bytes, json reads UTF-8 (with a BOM too) and UTF-16/32
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON or not text; Recursion: too deep
        raise UsageError(f"cannot read ensemble {path}: {error}") from error
    reason = record_problem(record)
    if reason:
        raise UsageError(f"{path} is not a valid ensemble file: {reason}. python evaluate.py --refit writes a new "
                         "one")
    return record


def members_of(record, ensemble_path):
    """Every member of a loaded ensemble record, zero weights too, with its path resolved against the
    folder of the file it was read from."""
    folder = Path(ensemble_path).parent
    return [Member(folder / m["path"], m["weight"], m["sha256"]) for m in record["members"]]


def matches(record, ensemble_path, member_paths, tta):
    """True when `record` (read from `ensemble_path`) was fitted for exactly these checkpoint files (by
    content) and this TTA."""
    saved = [(m.path.resolve(), m.sha256) for m in members_of(record, ensemble_path)]
    return record["tta"] == tta and saved == [(Path(p).resolve(), file_hash(p)) for p in member_paths]
