"""Prediction speed benchmark: single-face latency and batch throughput of predict.py's per-face path
(crop, resize to 48x48, the ensemble's models), without and with Haar face detection on 640x480 images.

    python benchmarks/predict_speed.py                      # runs/evaluation/ensemble.json, else runs/**/best.pt
    python benchmarks/predict_speed.py --checkpoints runs/model_x/best.pt --precision fp32

It trains nothing: it times already-trained checkpoints on synthetic faces pasted on a textured
background, prints a markdown table, and writes the figures to --out as JSON.
"""
import argparse
import statistics

import numpy as np
import torch

from common import machine, publish, timings

import predict  # noqa: E402  (common put the repository on the path)
import synthetic  # noqa: E402
from evaluate import TTA_CHOICES  # noqa: E402
from models import default_threads  # noqa: E402

IMAGE_SIZE = (640, 480)
FACE_SIZE = 160


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoints", nargs="+", default=None, help="checkpoint files; unset: see --ensemble")
    source.add_argument("--ensemble", default=None,
                        help="ensemble.json; unset: runs/evaluation/ensemble.json if it exists, else every runs/**/best.pt")
    p.add_argument("--faces", type=predict.positive_int, default=128, help="images (one face each) in the batch runs")
    p.add_argument("--repeats", type=predict.positive_int, default=50, help="calls whose median is the latency")
    p.add_argument("--tta", default=None, choices=TTA_CHOICES, help="unset: the ensemble's recorded one, none otherwise")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="as in predict.py")
    p.add_argument("--threads", type=predict.positive_int, default=default_threads(), help="CPU threads")
    p.add_argument("--out", default="runs/benchmarks/predict_speed.json", help="JSON file for the figures")
    return p


def scenes(count, seed=0):
    """`count` grayscale 640x480 images, each with one synthetic face at a known box."""
    from PIL import Image
    faces = synthetic.render_split("test", -(-count // len(synthetic.CLASSES)), seed=seed)[0][:count]
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    images, boxes = [], []
    for face in faces:
        # A lit wall with noise: the cascade has texture to reject, as in a real photo.
        background = np.linspace(60, 200, width)[None, :] + rng.normal(0, 15, (height, width))
        x, y = int(rng.integers(0, width - FACE_SIZE)), int(rng.integers(0, height - FACE_SIZE))
        background[y:y + FACE_SIZE, x:x + FACE_SIZE] = np.asarray(
            Image.fromarray(face).resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR))
        images.append(np.clip(background, 0, 255).astype(np.uint8))
        boxes.append((x, y, FACE_SIZE, FACE_SIZE))
    return images, boxes


def median_ms(function, repeats, warm=3):
    return 1000 * statistics.median(timings(function, repeats, warm))


def measure(predictor, cascade, images, boxes, repeats):
    image, box = images[0], boxes[0]

    def one_face():
        return predictor.probabilities(predict.crop_face(image, box)[None])

    def one_image_detected():
        found = predict.detect_faces(image, cascade) or [box]  # always classify one face, found or not
        return predictor.probabilities(np.stack([predict.crop_face(image, b) for b in found]))

    found_by_cascade = []

    def batch(detect):
        found = [predict.detect_faces(i, cascade) for i in images] if detect else [[] for _ in images]
        found_by_cascade[:] = [bool(f) for f in found]
        crops = [predict.crop_face(i, b) for i, f, box in zip(images, found, boxes) for b in (f or [box])]
        return predictor.probabilities(np.stack(crops))

    figures = {
        "single_face_ms": median_ms(one_face, repeats),
        "detection_ms": median_ms(lambda: predict.detect_faces(image, cascade), repeats),
        "single_image_with_detection_ms": median_ms(one_image_detected, repeats),
        # batches take long enough that two timed runs, after the warm-up above, give a stable median
        "batch_faces_per_s": len(images) / (median_ms(lambda: batch(False), 2, 0) / 1000),
        "batch_images_per_s_with_detection": len(images) / (median_ms(lambda: batch(True), 2, 0) / 1000),
    }
    return {**figures, "synthetic_faces_found_by_cascade": sum(found_by_cascade)}


def markdown(result):
    r, m = result["figures"], result["machine"]
    return "\n".join([
        f"**Prediction speed**: {m['processor']}, {result['threads']} thread(s) of {m['cpu_count']} CPUs, "
        f"torch {m['torch']}, device {result['device']}, precision {result['precision']}, "
        f"{len(result['models'])} model(s), TTA {result['tta']}", "",
        "| measurement | value |", "| --- | ---: |",
        f"| one face, no detection (crop + resize + models), median of {result['repeats']} | {r['single_face_ms']:.2f} ms |",
        f"| face detection alone, one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image | {r['detection_ms']:.2f} ms |",
        f"| one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, detection + crop + models | {r['single_image_with_detection_ms']:.2f} ms |",
        f"| batch of {result['faces']} faces, no detection | {r['batch_faces_per_s']:.0f} faces/s |",
        f"| batch of {result['faces']} images, with detection | {r['batch_images_per_s_with_detection']:.1f} images/s |",
        "", f"The cascade found {r['synthetic_faces_found_by_cascade']} of the {result['faces']} drawn synthetic faces "
        "(cartoon faces, not what it was trained on); where it found none, the known box was classified, "
        "so every timing includes one face through the models."])


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    predict.cv2.setNumThreads(args.threads)
    members, recorded_tta = predict.resolve_members(args.checkpoints, args.ensemble)
    predictor = predict.Predictor(members, args.tta or recorded_tta or "none", args.device, args.precision)
    images, boxes = scenes(args.faces)
    figures = measure(predictor, predict.load_cascade(), images, boxes, args.repeats)
    result = {"machine": machine(), "threads": args.threads, "device": str(predictor.device),
              "precision": predictor.precision, "tta": predictor.tta, "models": [str(p) for p in predictor.paths],
              "weights": predictor.weights.tolist(), "faces": args.faces, "repeats": args.repeats,
              "figures": {k: round(v, 3) for k, v in figures.items()}}
    return publish(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
