"""Where the found faces lose accuracy against the ceiling: the aligned crop of each face CenterFace finds
in scenes.py's scenes, with one part of its framing (tilt, side, centre) swapped for the true one at a time.

    python benchmarks/framing.py                    # 300 scenes, seed 1 (the scenes the framing was tuned on)
    python benchmarks/framing.py --seed 0           # scenes.py's benchmark scenes

Each row reads the same found faces with the shipped ensemble as predict.py runs it. "aligned" is
predict.py's crop, "ceiling" the true box turned upright; the rows between say which part of the
difference each of tilt, side and centre holds; "three sides" averages the answers for crops 0.9, 1 and
1.1 times the aligned side.
"""
import argparse

import numpy as np

from common import machine, peak_text, publish

from ferkit import cli, detect  # noqa: E402  (common: the path)
from ferkit.inference import ONE_FACE_TTA, TTA_CHOICES, Predictor  # noqa: E402
import scenes  # noqa: E402

# (row, which of (centre, angle, side) come from the truth)
VARIANTS = [("aligned", ()), ("true tilt", ("angle",)), ("true side", ("side",)), ("true centre", ("centre",)),
            ("true centre and side", ("centre", "side")), ("ceiling: all true", ("centre", "angle", "side"))]
SIDE_SCALES = (0.9, 1.0, 1.1)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=scenes.DEFAULT_DATA, help="FER-2013 folder whose val/ split gives the faces")
    p.add_argument("--scenes", type=cli.positive(int), default=300, help="scenes generated")
    p.add_argument("--seed", type=int, default=1, help="seeds the scenes, as in scenes.py")
    p.add_argument("--tta", default=ONE_FACE_TTA, choices=TTA_CHOICES, help="as in predict.py")
    p.add_argument("--out", default="runs/benchmarks/framing.json", help="JSON file for the figures")
    return p


def framing(placed, face, true_parts, side_scale=1.0):
    """(centre, angle, side) of the aligned crop, the parts named in true_parts taken from the truth."""
    centre, angle, side = detect.aligned_square(face.landmarks)
    truth = {"centre": np.asarray(placed.centre), "angle": -placed.tilt, "side": placed.side}
    chosen = {"centre": centre, "angle": angle, "side": side, **{part: truth[part] for part in true_parts}}
    return chosen["centre"], chosen["angle"], chosen["side"] * side_scale


def probabilities(predictor, pairs, true_parts, side_scale=1.0):
    crops = [detect.upright_crop(scene, *framing(placed, face, true_parts, side_scale)) for scene, placed, face in pairs]
    return predictor.predict_faces(np.stack(crops))


def rows(predictor, pairs, classes):
    truth = np.array([classes[placed.index] for _, placed, _ in pairs])
    right = lambda probs: round(100 * float((np.array(predictor.classes)[probs.argmax(1)] == truth).mean()), 1)
    table = [(label, right(probabilities(predictor, pairs, parts))) for label, parts in VARIANTS]
    averaged = sum(probabilities(predictor, pairs, (), scale) for scale in SIDE_SCALES)
    return table + [("aligned, three sides averaged", right(averaged))]


def main(argv=None):
    args = build_parser().parse_args(argv)
    faces, classes = scenes.val_faces(args.data)
    predictor = Predictor.pretrained(tta=args.tta)
    pairs = scenes.found_faces(scenes.generate(faces, args.scenes, args.seed))
    result = {"machine": machine(), "scenes": args.scenes, "seed": args.seed, "tta": predictor.tta,
              "faces_found": len(pairs), "rows": dict(rows(predictor, pairs, classes))}
    m = result["machine"]
    table = "\n".join([f"**Framing**: the {len(pairs)} faces CenterFace found in {args.scenes} scenes (seed {args.seed}), "
                       f"the shipped ensemble ({predictor.backend}, {predictor.about.precision}), TTA {predictor.tta}; "
                       f"{m['processor']} ({peak_text(m)})", "", "| crop | emotion right % |", "| --- | ---: |"]
                      + [f"| {label} | {value:.1f} |" for label, value in result["rows"].items()])
    return publish(result, table, args.out)


if __name__ == "__main__":
    cli.run(main)
