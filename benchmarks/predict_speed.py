"""Prediction speed benchmark: one face, one photo and a batch through predict.py's path (the default
detector, crop, resize to 48x48, the ensemble), and each backend with each TTA, on 640x480 images.

    python benchmarks/predict_speed.py                      # the shipped weights/ensemble.json, as predict.py runs it
    python benchmarks/predict_speed.py --backend torch --precision fp32
    python benchmarks/predict_speed.py --runs runs --onnx-int8 weights/ensemble-int8.onnx
    python benchmarks/predict_speed.py --video --video-frames 300 --tta flip   # the video path, stage by stage

It trains nothing: it times already-trained models on synthetic faces pasted on a textured background,
prints markdown tables, and writes the figures to --out as JSON. The first table is predict.py's path
with its defaults (--backend auto: ONNX Runtime on a CPU, the shipped ensemble as its int8 graph); the
second compares backends: torch in the precision --precision auto takes on this machine (and bf16 where
the CPU runs it natively), ONNX Runtime fp32 (the models' graph as predict.py builds it) and int8 (the
graph the ensemble file records, or --onnx-int8), each with TTA none, flip, centre-3, centre-full and tencrop-full.
With --video, it times predict.py's video path instead (the flags of "the --video part").
"""
import argparse
import statistics
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from common import CPU_PRECISION, machine, peak_text, publish, timings

from ferkit import cli, inference, onnx_graph, synthetic, synthetic_video, video  # noqa: E402  (common: the path)
from ferkit.detect import DEFAULT_DETECTOR, DETECTORS, Face  # noqa: E402
from ferkit.inference import ONE_FACE_TTA, TTA_CHOICES, Predictor, choose_models  # noqa: E402

IMAGE_SIZE = (640, 480)
FACE_SIZE = 160


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_flags(p)
    p.add_argument("--faces", type=cli.positive(int), default=128, help="images (one face each) in the batch runs")
    p.add_argument("--repeats", type=cli.positive(int), default=50, help="calls whose median is the latency")
    p.add_argument("--tta", default=ONE_FACE_TTA, choices=TTA_CHOICES, help="of the first table, as in predict.py")
    p.add_argument("--backend", default="auto", choices=onnx_graph.BACKENDS, help="of the first table, as in predict.py")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS, help="as in predict.py")
    cli.add_device_flags(p, batch_size=256, batch_help="faces per forward pass, as in predict.py")
    p.add_argument("--onnx-int8", default=None, metavar="PATH",
                   help="int8 file (export.py --format onnx-int8) for the ONNX Runtime int8 row; unset: the one the "
                        "ensemble file records, if any, else no int8 row")
    p.add_argument("--out", default="runs/benchmarks/predict_speed.json", help="JSON file for the figures")
    add_video_flags(p)
    return p


def scenes(count, seed=0):
    """`count` grayscale 640x480 images, each with one synthetic face at a known box."""
    from PIL import Image
    faces = synthetic.render_split("test", -(-count // len(synthetic.CLASSES)), seed=seed)[0][:count]
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    images, boxes = [], []
    for face in faces:
        # A lit wall with noise: the detector has texture to reject, as in a real photo.
        background = np.linspace(60, 200, width)[None, :] + rng.normal(0, 15, (height, width))
        x, y = int(rng.integers(0, width - FACE_SIZE)), int(rng.integers(0, height - FACE_SIZE))
        background[y:y + FACE_SIZE, x:x + FACE_SIZE] = np.asarray(
            Image.fromarray(face).resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR))
        images.append(np.clip(background, 0, 255).astype(np.uint8))
        boxes.append((x, y, FACE_SIZE, FACE_SIZE))
    return images, boxes


def median_ms(function, repeats, warm=3):
    return 1000 * statistics.median(timings(function, repeats, warm))


def faces_or_known(predictor, image, box, found):
    """The image's found faces' crops, else its known box's: every timing sends at least one face through the
    models, as a photo of a person would (the drawn faces are cartoons, which detectors may miss)."""
    located = predictor.locate(image)
    found.append(bool(located[0]))
    return located[1] if located[0] else inference.crop_face(image, box)[None]


def measure(predictor, images, boxes, repeats):
    image, box = images[0], boxes[0]
    found = []
    figures = {
        "single_face_ms": median_ms(lambda: predictor.predict_faces(inference.crop_face(image, box)[None]), repeats),
        "detection_ms": median_ms(lambda: predictor.detected(image), repeats),
        "single_image_with_detection_ms": median_ms(
            lambda: predictor.predict_faces(faces_or_known(predictor, image, box, [])), repeats),
        # batches take long enough that two timed runs, after the warm-up above, give a stable median
        "batch_faces_per_s": len(images) / (median_ms(lambda: predictor.predict_faces(
            np.stack([inference.crop_face(i, b) for i, b in zip(images, boxes)])), 2, 0) / 1000),
        "batch_images_per_s_with_detection": len(images) / (median_ms(lambda: predictor.predict_faces(
            np.concatenate([faces_or_known(predictor, i, b, found) for i, b in zip(images, boxes)])), 2, 0) / 1000),
    }
    return {**figures, "synthetic_faces_found": sum(found[-len(images):])}


BACKEND_TTAS = ["none", "flip", "centre-3", "centre-full", "tencrop-full"]


def backend_predictors(args, choice):
    """(row label, predictor) for every backend compared: torch in this CPU's training precision on --device
    (bf16 too where the CPU runs it natively), and on ONNX Runtime's CPU execution provider the models' fp32
    graph and the int8 graph (--onnx-int8, else the one the ensemble file records)."""
    options = dict(batch_size=args.batch_size, threads=args.threads)
    precisions = ["bf16", "fp32"] if CPU_PRECISION == "bf16" else ["fp32"]
    rows = [(f"torch {precision}", Predictor.from_choice(choice, "none", "torch", args.device, precision=precision,
                                                         **options)) for precision in precisions]
    rows.append(("ONNX Runtime fp32", Predictor.from_members(choice.members, "none", backend="onnx", **options)))
    if args.onnx_int8:
        rows.append(("ONNX Runtime int8", Predictor.from_onnx(args.onnx_int8, "none", **options)))
    elif choice.graph:  # Predictor.from_choice on ONNX Runtime runs a recorded graph, hash-checked
        rows.append(("ONNX Runtime int8", Predictor.from_choice(choice, "none", "onnx", **options)))
    return rows


def measure_backend(predictor, crops, repeats):
    """One-face latency (median ms) and faces/s for all `crops` in one call, for each TTA of BACKEND_TTAS."""
    figures = {"one_face_ms": {}, "faces_per_s": {}}
    for tta in BACKEND_TTAS:
        predictor.tta = tta  # the same loaded networks, another set of views
        figures["one_face_ms"][tta] = round(median_ms(lambda: predictor.predict_faces(crops[:1]), repeats), 3)
        seconds = median_ms(lambda: predictor.predict_faces(crops), 2, 1) / 1000
        figures["faces_per_s"][tta] = round(len(crops) / seconds, 1)
    return figures


def backend_table(result):
    rows = result["backends"]
    header = " | ".join([f"one face, TTA {t}" for t in BACKEND_TTAS]
                        + [f"batch of {result['faces']}, TTA {t}" for t in BACKEND_TTAS])
    lines = [f"**Backends**: one face = one 48x48 crop to probabilities, median of {result['repeats']} calls; batch = "
             f"{result['faces']} crops in one call; torch on {result['device']}, ONNX Runtime on CPU", "",
             f"| backend | {header} |", "| --- |" + " ---: |" * 2 * len(BACKEND_TTAS)]
    for row in rows:
        cells = [f"{row['one_face_ms'][t]:.2f} ms" for t in BACKEND_TTAS] \
            + [f"{row['faces_per_s'][t]:.0f} faces/s" for t in BACKEND_TTAS]
        lines.append(f"| {row['backend']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result):
    r, m = result["figures"], result["machine"]
    return "\n".join([
        f"**Prediction speed**: {m['processor']} ({peak_text(m)}), "
        f"{result['threads']} thread(s) of {m['cpu_count']} CPUs, "
        f"torch {m['torch']}, backend {result['backend']} ({result['precision']}), detector {result['detector']}, "
        f"{len(result['members'])} model(s), TTA {result['tta']}", "",
        "| measurement | value |", "| --- | ---: |",
        f"| one face, no detection (crop + resize + models), median of {result['repeats']} | {r['single_face_ms']:.2f} ms |",
        f"| face detection alone, one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image | {r['detection_ms']:.2f} ms |",
        f"| one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, detection + crop + models | {r['single_image_with_detection_ms']:.2f} ms |",
        f"| batch of {result['faces']} faces, no detection | {r['batch_faces_per_s']:.0f} faces/s |",
        f"| batch of {result['faces']} images, with detection | {r['batch_images_per_s_with_detection']:.1f} images/s |",
        "", f"The detector found {r['synthetic_faces_found']} of the {result['faces']} drawn synthetic faces "
        "(cartoon faces, not what it was trained on); where it found none, the known box was classified, "
        "so every timing includes one face through the models."])


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    choice = choose_models(args.checkpoints, args.ensemble, args.runs)
    predictor = Predictor.from_choice(choice, args.tta, args.backend, args.device, args.batch_size, args.threads,
                                      precision=args.precision).use_detector(args.detector)
    if args.video:
        return main_video(predictor, args)
    images, boxes = scenes(args.faces)
    figures = measure(predictor, images, boxes, args.repeats)
    crops = np.stack([inference.crop_face(image, box) for image, box in zip(images, boxes)])
    backends = [{"backend": label, "file": str(p.files[0]) if p.backend == "onnx" else None,
                 **measure_backend(p, crops, args.repeats)} for label, p in backend_predictors(args, choice)]
    result = {**described(predictor, args), "faces": args.faces, "repeats": args.repeats,
              "weights": predictor.about.weights.tolist(), "figures": {k: round(v, 3) for k, v in figures.items()},
              "backends": backends}
    return publish(result, markdown(result) + "\n\n" + backend_table(result), args.out)


def described(predictor, args):
    """What every result records about the machine and the models it timed."""
    return {"machine": machine(), "threads": args.threads, "device": str(predictor.device), "backend": predictor.backend,
            "precision": predictor.about.precision, "detector": predictor.detector, "tta": predictor.tta,
            "members": list(predictor.about.members), "models": [str(p) for p in predictor.files]}


# The --video part: predict.py's video path (video.py), stage by stage, on a synthetic clip.
VIDEO_FPS = 30.0
VIDEO_STAGES = {"decode": "decode: read and decode a frame",
                "detect": "detect: grayscale, downscale, the detector on every K-th frame",
                "classify": "crop + classify: each face's 48x48 crop through the models",
                "annotate": "annotate: boxes, labels and probability bars",
                "encode": "encode: the MJPG writer"}


def add_video_flags(p):
    part = p.add_argument_group("the --video part")
    part.add_argument("--video", action="store_true",
                      help="instead of the tables above, time predict.py's video path stage by stage on a "
                           f"synthetic {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} clip with one face")
    part.add_argument("--video-frames", type=cli.positive(int), default=300, help="frames in the clip")
    part.add_argument("--detect-every", type=cli.positive(int), default=video.DETECT_EVERY, help="as in predict.py")
    part.add_argument("--detect-side", type=cli.positive(int), default=video.DETECT_SIDE, help="as in predict.py")
    part.add_argument("--video-out", default="runs/benchmarks/predict_speed_video.json",
                      help="JSON file for the --video figures")


def detected_or_drawn_frame(detected, counts):
    """Predictor.detected, falling back on the white frame drawn around the synthetic face where the
    detector (trained on photographs) finds none: every frame then sends one face through the models, as
    a video of a person would, and the detector's time still counts."""
    def find(gray, max_side=inference.DETECT_MAX_SIDE):
        faces = detected(gray, max_side)
        counts["detections"] += 1
        counts["found"] += bool(faces)
        return faces or [Face(box) for box in synthetic_video.find_framed_face(gray)]
    return find


def run_clip(predictor, clip, options, out_path=None):
    capture = cv2.VideoCapture(str(clip))
    try:
        return video.process_stream(capture, str(clip), predictor, options, out_path)
    finally:
        capture.release()


def measure_video(predictor, args):
    """Milliseconds per frame in each stage and end to end, decoding to encoding, after a warm-up."""
    counts = {"detections": 0, "found": 0}
    predictor.detected = detected_or_drawn_frame(predictor.detected, counts)
    options = argparse.Namespace(no_detect=False, detect_every=args.detect_every, detect_side=args.detect_side,
                                 smoothing=video.SMOOTHING, max_frames=None, json=False, top_k=3)
    with tempfile.TemporaryDirectory() as folder:
        clip = Path(folder) / "clip.avi"
        synthetic_video.write_clip(clip, args.video_frames, IMAGE_SIZE, VIDEO_FPS, FACE_SIZE, textured=True)
        run_clip(predictor, clip, argparse.Namespace(**{**vars(options), "max_frames": 10}))  # first calls are slow
        counts.update(detections=0, found=0)
        result = run_clip(predictor, clip, options, Path(folder) / "annotated.avi")
    frames = result["frames"]
    figures = {f"{stage}_ms": 1000 * result["stages"].get(stage, 0.0) / frames for stage in VIDEO_STAGES}
    return {**figures, "total_ms": 1000 * result["seconds"] / frames, "fps": result["fps"], "frames": frames, **counts}


def video_markdown(result):
    r, m = result["figures"], result["machine"]
    rows = [f"| {VIDEO_STAGES[stage]} | {r[stage + '_ms']:.2f} |" for stage in VIDEO_STAGES]
    return "\n".join([
        f"**Video pipeline**: {m['processor']} ({peak_text(m)}), "
        f"{result['threads']} thread(s) of {m['cpu_count']} CPUs, "
        f"torch {m['torch']}, backend {result['backend']} ({result['precision']}), detector {result['detector']}, "
        f"{len(result['members'])} model(s), TTA {result['tta']}; a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} clip of "
        f"{r['frames']} frames with one face, faces looked for every {result['detect_every']} frames on a copy "
        f"whose longest side is {result['detect_side']}", "",
        "| stage | ms per frame |", "| --- | ---: |", *rows,
        f"| **total, end to end** | {r['total_ms']:.2f} ms: **{r['fps']:.1f} frames/s** |", "",
        f"The detector found the drawn face in {r['found']} of {r['detections']} detections; in the "
        "others the white frame drawn around it stood in, so that every frame sends one face through the models."])


def main_video(predictor, args):
    figures = measure_video(predictor, args)
    result = {**described(predictor, args), "detect_every": args.detect_every, "detect_side": args.detect_side,
              "figures": {k: round(v, 3) for k, v in figures.items()}}
    return publish(result, video_markdown(result), args.video_out)


if __name__ == "__main__":
    cli.run(main)
