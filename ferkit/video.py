"""Emotions over time in video files and camera streams, for predict.py.

Each frame goes through the same steps as a photo (inference.Predictor finds faces, crops them to
48x48 and classifies them), with three changes that make it steady and fast enough for a laptop CPU:
faces are followed from frame to frame (boxes matched by overlap), each followed face's box and
landmarks are steadied (blended with where it was) and its probabilities smoothed over time so that
neither its crop nor its label flickers, and faces are looked for on a downscaled frame, only every
few frames while nothing changes; in between, the faces stay where they were. Each face is cut out
as in a photo (detect.face_crop): aligned from its landmarks where the detector gives them.

    python predict.py clip.mp4 --out annotated/ --json > frames.jsonl
    python predict.py --camera 0 --max-frames 300 --out annotated/
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from ferkit import cli
from ferkit.cli import UsageError
from ferkit.detect import Face
from ferkit.inference import annotated_path, cut_face, face_record, log, whole_image_face

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv"}
OUTPUT_FOURCC, OUTPUT_SUFFIX = "MJPG", ".avi"  # every OpenCV build writes it; each frame decodes on its own
DEFAULT_FPS = 30.0  # for streams that do not say (most webcams, some files)
MIN_IOU = 0.3  # boxes of one face in two detections overlap at least this much
MAX_MISSED_DETECTIONS = 3  # a detector misses a face now and then: its track outlives a few misses
MAX_FAILED_READS = 5  # consecutive failed reads that end a stream; fewer, followed by a frame, are skipped
FRAME_COUNT_SLACK = 0.02  # containers such as mkv and webm estimate their frame count from the duration
SMOOTHING, DETECT_EVERY, DETECT_SIDE = 0.6, 5, 320  # the flags' defaults, shared with the speed benchmark
# Weight of the past when a detection moves a followed face's box and landmarks. Detectors jitter by a
# few pixels from one detection to the next, even on a still face; the crop (so the label) and the drawn
# box would shake with them. More weight steadies more but lags further behind a moving face (by
# weight / (1 - weight) times its motion between two detections: at 0.5, one detection's motion).
STEADYING = 0.5

BOX_COLOR, TEXT_COLOR, BAR_COLOR = (40, 40, 255), (255, 255, 255), (40, 200, 255)  # BGR
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class Track:
    """One face followed across frames: its steadied box (whole pixels) and landmarks (float [5, 2], or
    None where the detector gives none: Haar, --no-detect), and its smoothed probabilities."""
    id: int
    box: tuple
    probs: np.ndarray = None
    missed: int = 0  # detections in a row that did not find it
    landmarks: np.ndarray = None

    @property
    def face(self):
        return Face(self.box, self.landmarks)


def smoothing_weight(text):
    """An argparse type: the weight of the past in the moving average, from 0 (off) to below 1."""
    value = cli.probability(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be below 1: at 1 the labels would never change")
    return value


def add_video_flags(parser):
    group = parser.add_argument_group("videos and camera")
    group.add_argument("--camera", type=int, default=None, metavar="N",
                       help="read camera N (0: the default one) until Ctrl-C or --max-frames")
    group.add_argument("--max-frames", type=cli.positive(int), default=None,
                       help="stop each video or the camera after this many frames; unset: all")
    group.add_argument("--smoothing", type=smoothing_weight, default=SMOOTHING,
                       help="weight of the past in each face's moving average of probabilities; 0: off")
    group.add_argument("--detect-every", type=cli.positive(int), default=DETECT_EVERY, metavar="K",
                       help="look for faces every K-th frame while the faces found stay the same")
    group.add_argument("--detect-side", type=cli.positive(int), default=DETECT_SIDE,
                       help="longest side, in pixels, of the downscaled frame that faces are looked for on")


def is_video(path):
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def quiet_decoder_logs():
    """Decoding errors are counted and reported once at the end; FFmpeg's and OpenCV's own lines about
    them would otherwise flood stderr. OPENCV_FFMPEG_LOGLEVEL, if set, wins."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def frame_rate(capture):
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if np.isfinite(fps) and 0 < fps < 1000 else DEFAULT_FPS


def read_frames(capture, stop):
    """Each frame read, as a BGR array, or None for a frame that failed to decode between good ones.
    Ends after MAX_FAILED_READS failed reads in a row (the end of a file, a camera unplugged) or
    once stop() is true."""
    failures = 0
    while not stop():
        ok, frame = capture.read()
        if not ok:
            failures += 1
            if failures >= MAX_FAILED_READS:
                return
            continue
        yield from [None] * failures
        failures = 0
        yield frame


@contextlib.contextmanager
def stop_on_interrupt():
    """Within: the first Ctrl-C (SIGINT) only raises a flag that the frame loop checks between frames,
    so that the outputs end on a whole frame; a second one interrupts at once. Yields stopped()."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield requested.is_set
        return

    def handle(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        log("interrupted: finishing the outputs (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def stage_clock():
    """(totals, lap): lap(stage) adds the seconds since the previous lap to totals[stage]."""
    totals, last = defaultdict(float), [time.perf_counter()]

    def lap(stage):
        now = time.perf_counter()
        totals[stage] += now - last[0]
        last[0] = now
    return totals, lap


def frame_faces(predictor, gray, args):
    """The faces (detect.Face) in full-frame pixels, looked for on a copy whose longest side is
    args.detect_side; with --no-detect the whole frame is one face, without landmarks."""
    return [whole_image_face(gray)] if args.no_detect else predictor.detected(gray, args.detect_side)


def iou_matrix(boxes_a, boxes_b):
    """Intersection over union of every (x, y, w, h) box in boxes_a with every one in boxes_b."""
    a, b = np.asarray(boxes_a, dtype=float)[:, None], np.asarray(boxes_b, dtype=float)[None]
    width = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    height = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(width, 0, None) * np.clip(height, 0, None)
    return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


def match_boxes(old, new):
    """Pairs (i, j): old[i] and new[j] are the same face. The pairing with the largest total overlap,
    less pairs that barely overlap."""
    if not old or not new:
        return []
    overlap = iou_matrix(old, new)
    rows, columns = linear_sum_assignment(overlap, maximize=True)
    return [(i, j) for i, j in zip(rows, columns) if overlap[i, j] >= MIN_IOU]


def follow(tracks, faces, next_id):
    """The tracks after a detection found `faces` (detect.Face): matched tracks move part of the way to
    their face (steady), unmatched ones stay until MAX_MISSED_DETECTIONS misses, unmatched faces start
    new tracks where they are. Returns (tracks, next free id, whether anything changed)."""
    pairs = match_boxes([t.box for t in tracks], [face.box for face in faces])
    matched_tracks, matched_faces = {i for i, _ in pairs}, {j for _, j in pairs}
    for i, j in pairs:
        steady(tracks[i], faces[j], STEADYING)
        tracks[i].missed = 0
    for i, track in enumerate(tracks):
        track.missed += i not in matched_tracks
    new = [Track(next_id + n, face.box, landmarks=face.landmarks) for n, face in
           enumerate(face for j, face in enumerate(faces) if j not in matched_faces)]
    kept = [t for t in tracks if t.missed <= MAX_MISSED_DETECTIONS]
    changed = len(pairs) < max(len(tracks), len(faces))
    return kept + new, next_id + len(new), changed


def smooth(previous, current, weight):
    """Exponential moving average: `weight` of the past, the rest from the current frame."""
    return current if previous is None else weight * previous + (1 - weight) * current


def steady(track, face, weight):
    """Move a track's box and landmarks to `weight` of theirs and the rest of its newly detected face's.
    Where only one of them has landmarks (the app's webcam switched --no-detect since), there is nothing
    alike to blend: the track starts again at the face."""
    if (track.landmarks is None) != (face.landmarks is None):
        track.box, track.landmarks = face.box, face.landmarks
        return
    box = smooth(np.asarray(track.box, dtype=float), np.asarray(face.box, dtype=float), weight)
    track.box = tuple(int(round(v)) for v in box)  # whole pixels, for drawing and JSON
    if face.landmarks is not None:
        track.landmarks = smooth(track.landmarks, face.landmarks, weight)


def track_crop(predictor, gray, track, args):
    """The 48x48 crop of a track's face, the one a photo's face gets (Predictor.locate): aligned from its
    steadied landmarks where it has them, else its box with the margin its detector's boxes need; with
    --no-detect the box (the whole frame) as it is."""
    return cut_face(gray, track.face, predictor.align, not args.no_detect)


def classify(predictor, gray, tracks, args):
    """Update each track's smoothed probabilities with its face in this frame, all faces in one batch."""
    if not tracks:
        return
    probs = predictor.predict_faces(np.array([track_crop(predictor, gray, t, args) for t in tracks]))
    for track, p in zip(tracks, probs):
        track.probs = smooth(track.probs, p, args.smoothing)


def new_session():
    """What track_faces keeps from one frame to the next, for one video, camera or browser visitor."""
    return {"tracks": [], "next_id": 1, "frame": 0, "next_detection": 0}


def track_faces(predictor, gray, session, args, lap=lambda stage: None):
    """One frame's faces: looked for when due (on the next frame while the faces found change, else every
    args.detect_every frames), followed from the last frame, and classified with smoothing. Updates
    `session` (new_session) and returns its tracks; lap(stage) is called after detection and classification."""
    if session["frame"] >= session["next_detection"]:
        faces = frame_faces(predictor, gray, args)
        session["tracks"], session["next_id"], changed = follow(session["tracks"], faces, session["next_id"])
        session["next_detection"] = session["frame"] + (1 if changed else args.detect_every)
    lap("detect")
    classify(predictor, gray, session["tracks"], args)
    lap("classify")
    session["frame"] += 1
    return session["tracks"]


def draw_track(frame, track, classes):
    """The box, '#id emotion NN%' beside it, and a small bar per emotion to the side of the box."""
    x, y, w, h = track.box
    side = min(frame.shape[:2])
    thickness, scale = max(1, round(side / 240)), max(0.35, side / 800)
    cv2.rectangle(frame, (x, y), (x + w - 1, y + h - 1), BOX_COLOR, thickness)
    best = int(np.argmax(track.probs))
    label = f"#{track.id} {classes[best]} {100 * track.probs[best]:.0f}%"
    (text_w, text_h), baseline = cv2.getTextSize(label, FONT, scale, 1)
    above = y >= text_h + baseline + 2 * thickness  # the label goes above the box where there is room
    bottom = y - thickness if above else min(y + h + text_h + baseline, frame.shape[0])
    cv2.rectangle(frame, (x, bottom - text_h - baseline - 2), (x + text_w + 4, bottom), BOX_COLOR, -1)
    cv2.putText(frame, label, (x + 2, bottom - baseline), FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)
    draw_bars(frame, track, classes, scale)


def draw_bars(frame, track, classes, scale):
    """One row per emotion (its first three letters and a bar as long as its probability), right of
    the box where there is room, else left of it."""
    x, y, w, h = track.box
    row = max(8, round(24 * scale))
    bar = 4 * row
    (text_w, _), _ = cv2.getTextSize("www", FONT, scale * 0.8, 1)
    left = x + w + 4 if x + w + 4 + text_w + bar < frame.shape[1] else max(0, x - 4 - text_w - bar)
    for i, (name, p) in enumerate(zip(classes, track.probs)):
        top = y + i * row
        cv2.putText(frame, name[:3], (left, top + row - 2), FONT, scale * 0.8, TEXT_COLOR, 1, cv2.LINE_AA)
        cv2.rectangle(frame, (left + text_w + 2, top + 2), (left + text_w + 2 + round(bar * p), top + row - 2),
                      BAR_COLOR, -1)


def open_writer(path, fps, frame):
    """A VideoWriter for frames like `frame`, writing to a hidden file beside `path` (renamed when
    finished, so that a half-written file never takes the name)."""
    partial = path.with_name(f".{path.stem}.partial{OUTPUT_SUFFIX}")
    height, width = frame.shape[:2]
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*OUTPUT_FOURCC), fps, (width, height))
    if not writer.isOpened():
        raise UsageError(f"OpenCV cannot write {OUTPUT_FOURCC} video to {partial}")
    return writer, partial


def frame_json(name, index, seconds, tracks, classes, top_k):
    faces = [{"track": t.id, **face_record(t.box, t.probs, classes, top_k)} for t in tracks]
    return json.dumps({"video": name, "frame": index, "time": round(seconds, 3), "faces": faces})


@contextlib.contextmanager
def annotated_video(out_path, fps):
    """Yields write(frame), which adds a frame to the annotated video at out_path, opened on the first frame
    (whose size it takes). On leaving, even by an exception, the video is finished and takes its name."""
    opened = []  # (writer, partial file) once the first frame came

    def write(frame):
        if not opened:
            opened.extend(open_writer(out_path, fps, frame))
        opened[0].write(frame)
    try:
        yield write
    finally:
        if opened:
            opened[0].release()  # writes the index: without it the file does not play
            os.replace(opened[1], out_path)


def process_stream(capture, name, predictor, args, out_path=None, live=False):
    """The frame loop over an opened capture: follow, classify and report every face of every frame,
    write the annotated video to out_path (if given). Returns a result dict with the seconds each
    emotion was the top one per track, and the seconds spent per stage."""
    fps, classes, session = frame_rate(capture), predictor.classes, new_session()
    on_top = defaultdict(Counter)  # track id -> emotion -> seconds
    frames, skipped, seconds = 0, 0, 0.0
    stages, lap = stage_clock()
    started = time.perf_counter()
    with stop_on_interrupt() as interrupted, annotated_video(out_path, fps) as write:
        for index, frame in enumerate(read_frames(capture, lambda: interrupted() or frames == args.max_frames)):
            lap("decode")
            if frame is None:
                skipped += 1
                continue
            now = time.perf_counter() - started if live else index / fps
            step, seconds = (now - seconds if live and frames else 1 / fps), now
            tracks = track_faces(predictor, cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), session, args, lap)
            for track in tracks:
                on_top[track.id][classes[int(np.argmax(track.probs))]] += step
            if args.json:
                print(frame_json(name, index, seconds, tracks, classes, args.top_k), flush=live)
            for track in tracks if out_path else []:
                draw_track(frame, track, classes)
            lap("annotate")
            if out_path:
                write(frame)
            frames += 1
            lap("encode")
    sys.stdout.flush()
    total = time.perf_counter() - started
    return {"video": name, "frames": frames, "skipped_frames": skipped, "interrupted": interrupted(),
            "annotated": str(out_path) if out_path and frames else None,
            "tracks": {track: dict(emotions) for track, emotions in on_top.items()},
            "stages": dict(stages), "seconds": total, "fps": frames / total if total else 0.0}


def stream_problem(result, capture, max_frames):
    """Why a stream's result is not the whole video, or None: no frames, or far fewer than it claims."""
    if result["interrupted"] or result["frames"] == max_frames:
        return None
    if result["frames"] == 0:
        return "no frame could be decoded" if result["skipped_frames"] else "it has no frames"
    claimed, read = capture.get(cv2.CAP_PROP_FRAME_COUNT), result["frames"] + result["skipped_frames"]
    if np.isfinite(claimed) and read < claimed * (1 - FRAME_COUNT_SLACK) - 2:
        return f"it ends after {read} of the {claimed:.0f} frames its header announces: truncated?"
    return None


def summary(result):
    """Lines for the end of a stream: frames, skipped frames, and per track how long each emotion led."""
    lines = [f"{result['video']}: {result['frames']} frame(s), {result['fps']:.1f} frames/s"
             + (f"; {result['skipped_frames']} frame(s) failed to decode and were skipped"
                if result["skipped_frames"] else "")
             + ("; interrupted" if result["interrupted"] else "")
             + (f"; annotated video {result['annotated']}" if result["annotated"] else "")]
    for track, emotions in result["tracks"].items():
        ranked = sorted(emotions.items(), key=lambda item: -item[1])
        lines.append(f"  track {track}: {sum(emotions.values()):.1f} s on screen; top emotion "
                     + ", ".join(f"{emotion} {seconds:.1f} s" for emotion, seconds in ranked))
    if not result["tracks"]:
        lines.append("  no face found")
    return lines


def report(result, args):
    for line in summary(result):
        print(line, file=sys.stderr if args.json else sys.stdout)


def run_video(path, root, predictor, args, used_names):
    """Process one video file. Returns (result or None, problem or None): problems are reported
    together once every input is done."""
    quiet_decoder_logs()
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return None, f"{path} (not a video OpenCV can read)"
        out_path = annotated_path(args.out, path, root, used_names, OUTPUT_SUFFIX) if args.out else None
        result = process_stream(capture, str(path), predictor, args, out_path)
        if result["frames"]:
            report(result, args)
        problem = stream_problem(result, capture, args.max_frames)
        return result, (f"{path} ({problem})" if problem else None)
    finally:
        capture.release()


def run_camera(index, predictor, args):
    """Process camera `index` until Ctrl-C or --max-frames; UsageError if there is no such camera."""
    quiet_decoder_logs()
    capture = cv2.VideoCapture(index)
    try:
        if not capture.isOpened():
            raise UsageError(f"cannot open camera {index}: no such camera, or it is in use")
        out_path = Path(args.out) / f"camera{index}{OUTPUT_SUFFIX}" if args.out else None
        result = process_stream(capture, f"camera {index}", predictor, args, out_path, live=True)
        report(result, args)
        if result["frames"] == 0 and not result["interrupted"]:
            raise UsageError(f"camera {index} opened but gave no frame")
        return result
    finally:
        capture.release()


def run_all(videos, camera, predictor, args, used_names):
    """Every video [(path, its input folder)], then the camera if one is given; their results. A video
    that cannot be used does not stop the others: they are all named in one UsageError at the end."""
    results, problems = [], []
    for path, root in videos:
        result, problem = run_video(path, root, predictor, args, used_names)
        results += [result] if result else []
        problems += [problem] if problem else []
        if result and result["interrupted"]:  # Ctrl-C stops the whole run, not just this video
            return results
    if camera is not None:
        results.append(run_camera(camera, predictor, args))
    if problems:
        raise UsageError(f"cannot use {len(problems)} video(s): {'; '.join(problems)}")
    return results
