"""Scene benchmark: FER-2013 validation faces placed into generated photos, read back by each detector.

    python benchmarks/scenes.py                          # 300 scenes, the shipped ensemble and its TTA
    python benchmarks/scenes.py --scenes 100 --tta flip --out runs/benchmarks/scenes.json

Each 640x480 grayscale scene is a seeded texture (blurred noise at several scales, a lighting gradient,
shapes) with 1-3 validation faces pasted at known boxes, 70-220 pixels wide, tilted by 0, 10, 20 or 30
degrees either way. For each detector, with its crops cut from the box and (where the detector gives
landmarks) aligned, it prints the faces found (a box overlapping the true square by IoU >= 0.3, or lying
within it: on_face), false boxes per 100 scenes, and the emotion right for all faces (a face not found
counts as wrong) and for the faces found, per tilt; and, as the ceiling, the emotion right for the same faces cut out at their true boxes and
turned upright, and for their original 48x48 crops. Scoring uses the shipped ensemble as predict.py runs it
(Predictor.pretrained: on a CPU its int8 graph), and for the default detector's aligned crops torch too.
Use validation faces only: the detector settings and the aligned framing are tuned on what this prints.
"""
import argparse
import time
from typing import NamedTuple

import cv2
import numpy as np

from common import machine, peak_text, publish

import data  # noqa: E402  (common: the path)
from ferkit import cli, detect  # noqa: E402
from ferkit.inference import ONE_FACE_TTA, TTA_CHOICES, Predictor  # noqa: E402

SCENE_SIZE = (640, 480)
FACE_SIDES = (70, 220)
TILTS = (0, 10, 20, 30)
FACES_PER_SCENE = (1, 3)
MATCH_IOU = 0.3
# Or a box that lies on a face's square (this share of it inside) and covers a tenth of it at least: some
# FER-2013 crops frame their face loosely, and a detector's box round such a face overlaps the whole square
# by less than MATCH_IOU while it is on the face all the same.
INSIDE, MIN_COVER = 0.7, 0.1
DEFAULT_DATA = "../shared/data/fer2013"


class Placed(NamedTuple):
    """A face put into a scene: its centre (x, y), side in pixels, tilt in degrees (counter-clockwise as
    seen), and which of the source faces it is."""
    centre: tuple
    side: int
    tilt: int
    index: int

    def box(self):
        """The upright square (x, y, w, h) the face's own 48x48 crop covers before it is tilted."""
        half = self.side / 2
        return (self.centre[0] - half, self.centre[1] - half, self.side, self.side)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="FER-2013 folder whose val/ split gives the faces")
    p.add_argument("--scenes", type=cli.positive(int), default=300, help="scenes generated")
    p.add_argument("--seed", type=int, default=0, help="seeds the scenes and which faces go into them")
    p.add_argument("--tta", default=ONE_FACE_TTA, choices=TTA_CHOICES, help="as in predict.py")
    p.add_argument("--detectors", nargs="+", default=list(detect.DETECTORS), choices=detect.DETECTORS)
    p.add_argument("--out", default="runs/benchmarks/scenes.json", help="JSON file for the figures")
    return p


def texture(rng, size=SCENE_SIZE):
    """uint8 [H, W]: blurred noise at several scales, a lighting gradient and a few filled shapes."""
    width, height = size
    scene = np.zeros((height, width), dtype=np.float32)
    for cell in (4, 16, 64):
        noise = rng.normal(0, 1, (height // cell + 1, width // cell + 1)).astype(np.float32)
        scene += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) * rng.uniform(10, 30)
    ys, xs = np.mgrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    scene += (np.cos(angle) * xs + np.sin(angle) * ys) / max(size) * rng.uniform(-80, 80) + rng.uniform(80, 170)
    for _ in range(rng.integers(2, 7)):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(10, 120)), int(rng.integers(10, 120)))
        cv2.ellipse(scene, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0, 255)), -1)
    return np.clip(scene, 0, 255).astype(np.uint8)


def free_spot(rng, extent, taken, size=SCENE_SIZE, tries=50):
    """A centre where a square of `extent` fits inside the scene without touching the squares `taken`
    ((centre, extent) pairs); None where none is found."""
    for _ in range(tries):
        centre = (rng.uniform(extent / 2, size[0] - extent / 2), rng.uniform(extent / 2, size[1] - extent / 2))
        if all(max(abs(centre[0] - c[0]), abs(centre[1] - c[1])) > (extent + e) / 2 for c, e in taken):
            return centre
    return None


def paste(scene, face, centre, side, tilt):
    """Put a 48x48 face into `scene` (in place), scaled to `side` and turned `tilt` degrees about `centre`."""
    matrix = cv2.getRotationMatrix2D((24.0, 24.0), tilt, side / 48)
    matrix[:, 2] += np.asarray(centre) - 24.0
    size = (scene.shape[1], scene.shape[0])
    warped = cv2.warpAffine(face, matrix, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones_like(face) * 255, matrix, size, flags=cv2.INTER_LINEAR)
    scene[:] = (scene * (255 - mask.astype(np.uint16)) // 255 + warped.astype(np.uint16) * mask // 255)


def make_scene(rng, faces):
    """(a 640x480 uint8 scene, [Placed]) with 1-3 of `faces` (uint8 [N, 48, 48]) chosen at random."""
    scene, placed, taken = texture(rng), [], []
    for _ in range(rng.integers(FACES_PER_SCENE[0], FACES_PER_SCENE[1] + 1)):
        side, tilt = int(rng.integers(FACE_SIDES[0], FACE_SIDES[1] + 1)), int(rng.choice(TILTS))
        tilt *= int(rng.choice([-1, 1]))
        extent = side * (abs(np.cos(np.radians(tilt))) + abs(np.sin(np.radians(tilt))))
        centre = free_spot(rng, extent, taken)
        if centre is None:
            continue
        index = int(rng.integers(len(faces)))
        paste(scene, faces[index], centre, side, tilt)
        taken.append((centre, extent))
        placed.append(Placed(centre, side, tilt, index))
    return scene, placed


def intersection(a, b):
    """The area two (x, y, w, h) boxes share."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return max(0.0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0.0, min(ay + ah, by + bh) - max(ay, by))


def iou(a, b):
    shared = intersection(a, b)
    return shared / (a[2] * a[3] + b[2] * b[3] - shared)


def on_face(box, square):
    """Whether `box` overlaps the true square by MATCH_IOU, or lies within it (INSIDE, MIN_COVER)."""
    area, side = box[2] * box[3], square[2]
    inside = intersection(box, square) / area
    return iou(box, square) >= MATCH_IOU or (inside >= INSIDE and area >= MIN_COVER * side * side)


def match(found, placed):
    """{index in placed: index in found}: each true face paired with its best-overlapping box on it (on_face),
    greedily."""
    pairs = sorted(((iou(f.box, p.box()), i, j) for j, f in enumerate(found) for i, p in enumerate(placed)
                    if on_face(f.box, p.box())), reverse=True)
    matched, used = {}, set()
    for overlap, i, j in pairs:
        if i not in matched and j not in used:
            matched[i] = j
            used.add(j)
    return matched


def ceiling_crop(scene, face):
    """The face cut out at its true box and turned upright (its eye line's angle in the image is -tilt)."""
    return detect.upright_crop(scene, face.centre, -face.tilt, face.side)


def val_faces(folder):
    """(uint8 faces [N, 48, 48], class names per face) of the folder's validation split."""
    split = data.load_split(folder, "val")
    return split.images[:, 0].numpy(), [split.classes[int(label)] for label in split.labels]


def found_faces(generated, detector_name=detect.DEFAULT_DETECTOR):
    """(scene, its true Placed face, the detector's Face matched to it) for every face found."""
    detector, pairs = detect.load_detector(detector_name), []
    for scene, placed in generated:
        found = detector(scene)
        pairs += [(scene, placed[i], found[j]) for i, j in match(found, placed).items()]
    return pairs


def detections(detector, scenes):
    """(per scene: its found faces, mean milliseconds per scene) of one detector."""
    started = time.perf_counter()
    found = [detector(scene) for scene, _ in scenes]
    return found, 1000 * (time.perf_counter() - started) / len(scenes)


def read_back(scenes, found, align):
    """(per true face: its crop or None where not found, false boxes in all): one detector's answer."""
    crops, false_boxes = [], 0
    for (scene, placed), faces in zip(scenes, found):
        matched = match(faces, placed)
        false_boxes += len(faces) - len(matched)
        crops += [detect.face_crop(scene, faces[matched[i]], align) if i in matched else None
                  for i in range(len(placed))]
    return crops, false_boxes


def shares(hits, tilts):
    """{'all': percent, '0': ..., '10': ...}: the percent of True in `hits`, overall and per |tilt|."""
    hits, tilts = np.asarray(hits, dtype=bool), np.abs(np.asarray(tilts))
    result = {"all": round(100 * hits.mean(), 1)}
    result.update({str(t): round(100 * hits[tilts == t].mean(), 1) if (tilts == t).any() else None for t in TILTS})
    return result


def score_row(name, crops, truth, tilts, predictor, false_boxes=0, scenes=1, ms=None):
    """One row of the table for per-face crops (None: not found) against the true classes."""
    found = [c is not None for c in crops]
    probs = predictor.predict_faces(np.stack([c for c in crops if c is not None]))
    answers = iter(predictor.classes[i] for i in probs.argmax(1))
    right = [f and next(answers) == t for f, t in zip(found, truth)]
    return {"name": name, "found": shares(found, tilts), "false_per_100_scenes": round(100 * false_boxes / scenes, 1),
            "right_of_all": shares(right, tilts), "right_of_found": round(100 * sum(right) / max(1, sum(found)), 1),
            "ms_per_scene": None if ms is None else round(ms, 1)}


def generate(faces, count, seed):
    rng = np.random.default_rng(seed)
    return [make_scene(rng, faces) for _ in range(count)]


def evaluate(scenes, faces, classes, predictors, detector_names):
    """The table's rows: each detector (box crops, and aligned where it gives landmarks), the default
    detector's crops through the second predictor too (the torch path), the ceiling and the faces' original
    crops. `predictors`: (the default path's, the torch path's)."""
    predictor, torch_predictor = predictors
    placed = [p for _, faces_in in scenes for p in faces_in]
    truth, tilts = [classes[p.index] for p in placed], [p.tilt for p in placed]
    rows = []
    for name in detector_names:
        found, ms = detections(detect.load_detector(name), scenes)
        aligned = [False, True] if any(f.landmarks is not None for faces_in in found for f in faces_in) else [False]
        for align in aligned:
            crops, false_boxes = read_back(scenes, found, align)
            label = f"{name}, {'aligned' if align else 'box'} crops"
            rows.append(score_row(label, crops, truth, tilts, predictor, false_boxes, len(scenes), ms))
            if name == detect.DEFAULT_DETECTOR and align:
                rows.append(score_row(f"{label}, torch {torch_predictor.about.precision}", crops, truth, tilts,
                                      torch_predictor, false_boxes, len(scenes), ms))
    ceiling = [ceiling_crop(scene, p) for scene, faces_in in scenes for p in faces_in]
    rows.append(score_row("ceiling: true boxes, upright", ceiling, truth, tilts, predictor, scenes=len(scenes)))
    rows.append(score_row("the faces' own 48x48 crops", [faces[p.index] for p in placed], truth, tilts, predictor,
                          scenes=len(scenes)))
    return rows


def per_tilt(figures):
    return " / ".join("-" if figures[str(t)] is None else f"{figures[str(t)]:.0f}" for t in TILTS)


def markdown(result):
    m = result["machine"]
    lines = [f"**Scene benchmark**: {result['scenes']} scenes of {SCENE_SIZE[0]}x{SCENE_SIZE[1]}, {result['faces']} "
             f"FER-2013 validation faces ({FACE_SIDES[0]}-{FACE_SIDES[1]} px, tilted 0-30 degrees), seed "
             f"{result['seed']}, the shipped ensemble with TTA {result['tta']} on {result['backend']} (predict.py's "
             f"defaults; one row on torch); {m['processor']} ({peak_text(m)}), "
             f"{m['usable_cpus']} usable CPU(s)", "",
             "| crops | found % | found % at 0/10/20/30 deg | false boxes /100 scenes | emotion right % of all "
             "| right % at 0/10/20/30 deg | right % of found | detection ms/scene |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ms = "-" if r["ms_per_scene"] is None else f"{r['ms_per_scene']:.0f}"
        lines.append(f"| {r['name']} | {r['found']['all']:.1f} | {per_tilt(r['found'])} | "
                     f"{r['false_per_100_scenes']:.1f} | {r['right_of_all']['all']:.1f} | "
                     f"{per_tilt(r['right_of_all'])} | {r['right_of_found']:.1f} | {ms} |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    faces, classes = val_faces(args.data)
    predictors = Predictor.pretrained(tta=args.tta), Predictor.pretrained(tta=args.tta, backend="torch")
    scenes = generate(faces, args.scenes, args.seed)
    rows = evaluate(scenes, faces, classes, predictors, args.detectors)
    result = {"machine": machine(), "scenes": args.scenes, "seed": args.seed, "tta": predictors[0].tta,
              "backend": f"{predictors[0].backend} ({predictors[0].about.precision})",
              "faces": sum(len(p) for _, p in scenes), "rows": rows}
    return publish(result, markdown(result), args.out)


if __name__ == "__main__":
    cli.run(main)
