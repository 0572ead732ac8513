"""A weighted average of several models' softmax probabilities, with weights fitted on validation.

The weights are non-negative and sum to one. Candidates: each member alone, equal weights, weights
proportional to validation accuracy, and the weights that minimise validation negative
log-likelihood over the simplex. The candidate with the best validation accuracy wins (ties go to the
lower likelihood loss), so the ensemble is never below its best member on validation. Fitting never
sees the test split.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from files import write_text_atomic

VERSION = 1


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


def save_ensemble(path, member_paths, classes, fit, tta):
    record = {"version": VERSION, "classes": list(classes), "tta": tta,
              "members": [{"path": str(p), "sha256": file_hash(p), "weight": w}
                          for p, w in zip(member_paths, fit["weights"])],
              "method": fit["method"], "val_accuracy": fit["val_accuracy"], "val_nll": fit["val_nll"],
              "candidates": fit["candidates"]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2))
    return record


def load_ensemble(path):
    """The saved ensemble as a dict; ValueError naming the file if it is not one."""
    try:
        record = json.loads(Path(path).read_text())
        if record.get("version") != VERSION or not record["members"]:
            raise ValueError("not an ensemble file of this version")
        return record
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read ensemble {path}: {error}") from error


def matches(record, member_paths, tta):
    """True when `record` was fitted for exactly these checkpoint files (by content) and this TTA."""
    saved = [(m["path"], m["sha256"]) for m in record["members"]]
    return record["tta"] == tta and saved == [(str(p), file_hash(p)) for p in member_paths]
