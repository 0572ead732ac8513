"""Which test-time augmentation reads faces best: each --tta choice of the shipped ensemble, on FER-2013's
validation crops and on the faces CenterFace finds in scenes.py's scenes, against a reference choice.

    python benchmarks/views.py                          # every choice, scenes of seeds 0-5, reference centre-full
    python benchmarks/views.py --ttas flip centre-3 --seeds 0

Each row: the choice's views, its accuracy on validation and on the found faces (aligned, as predict.py crops
them), and its difference from the reference on each, with a 95% paired-bootstrap interval (the same faces
resampled for both), so that a difference smaller than the noise reads as such.
"""
import argparse

import numpy as np

from common import machine, peak_text, publish

from ferkit import cli, detect  # noqa: E402  (common: the path)
from ferkit.inference import TTA_CHOICES, TTA_VIEWS, Predictor  # noqa: E402
import scenes  # noqa: E402

BOOTSTRAP_DRAWS, BOOTSTRAP_SEED = 2000, 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=scenes.DEFAULT_DATA, help="FER-2013 folder whose val/ split gives the faces")
    p.add_argument("--ttas", nargs="+", default=TTA_CHOICES, choices=TTA_CHOICES, help="choices compared")
    p.add_argument("--reference", default="centre-full", choices=TTA_CHOICES, help="the choice each is compared with")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(6)), help="scene seeds, as in scenes.py")
    p.add_argument("--scenes", type=cli.positive(int), default=300, help="scenes generated per seed")
    p.add_argument("--out", default="runs/benchmarks/views.json", help="JSON file for the figures")
    return p


def found_crops(faces, classes, seeds, count):
    """(uint8 aligned crops [N, 48, 48] of the faces CenterFace finds, their class names) over the scenes."""
    pairs = [pair for seed in seeds for pair in scenes.found_faces(scenes.generate(faces, count, seed))]
    crops = [detect.face_crop(scene, face, align=True) for scene, _, face in pairs]
    return np.stack(crops), [classes[placed.index] for _, placed, _ in pairs]


def right(predictor, crops, truth):
    """Per face, whether the ensemble's answer is its class."""
    answers = np.array(predictor.classes)[predictor.predict_faces(crops).argmax(1)]
    return answers == np.array(truth)


def difference(hits, reference):
    """(mean difference in points, its 95% paired-bootstrap interval)."""
    gained = hits.astype(float) - reference.astype(float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = [gained[rng.integers(0, len(gained), len(gained))].mean() for _ in range(BOOTSTRAP_DRAWS)]
    low, high = np.percentile(means, [2.5, 97.5])
    return [round(100 * gained.mean(), 2), round(100 * low, 2), round(100 * high, 2)]


def markdown(result):
    m, ref = result["machine"], result["reference"]
    signed = lambda d: f"{d[0]:+.2f} ({d[1]:+.1f} to {d[2]:+.1f})"
    lines = [f"**Test-time augmentation**: the shipped ensemble ({result['backend']}); {result['val_faces']} validation "
             f"crops and the {result['scene_faces']} faces CenterFace found in {result['scenes']} scenes (seeds "
             f"{' '.join(map(str, result['seeds']))}); differences from {ref} in points, 95% paired-bootstrap "
             f"interval in brackets; {m['processor']} ({peak_text(m)})", "",
             f"| --tta | views | validation % | photos % | validation - {ref} | photos - {ref} |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for tta, row in result["rows"].items():
        lines.append(f"| {tta} | {row['views']} | {row['val']:.2f} | {row['photos']:.2f} | "
                     f"{signed(row['val_diff'])} | {signed(row['photos_diff'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    faces, classes = scenes.val_faces(args.data)
    crops, truth = found_crops(faces, classes, args.seeds, args.scenes)
    predictors = {tta: Predictor.pretrained(tta=tta) for tta in dict.fromkeys([args.reference, *args.ttas])}
    hits = {tta: (right(p, faces, classes), right(p, crops, truth)) for tta, p in predictors.items()}
    ref_val, ref_photos = hits[args.reference]
    rows = {tta: {"views": TTA_VIEWS[tta],
                  "val": round(100 * val.mean(), 2), "photos": round(100 * photos.mean(), 2),
                  "val_diff": difference(val, ref_val), "photos_diff": difference(photos, ref_photos)}
            for tta, (val, photos) in hits.items() if tta in args.ttas}
    reference = predictors[args.reference]
    result = {"machine": machine(), "backend": f"{reference.backend}, {reference.about.precision}",
              "reference": args.reference, "seeds": args.seeds, "scenes": args.scenes * len(args.seeds),
              "val_faces": len(faces), "scene_faces": len(crops), "rows": rows}
    return publish(result, markdown(result), args.out)


if __name__ == "__main__":
    cli.run(main)
