"""A browser demo: upload or paste a photo, or use the webcam, and see every face's emotions.

    python app.py                                   # http://127.0.0.1:7860 with the shipped weights/
    python app.py --runs runs --port 7861           # your own models (or --ensemble, --checkpoints)
    make app                                        # installs requirements-app.txt first

A photo's answer comes from inference.annotate, the code behind predict.py; webcam frames go through
video.py's face tracking and smoothing. Everything the page needs is served from this machine: no
analytics, no fonts or scripts from other hosts, so it works with no internet.
"""
import os
import time

STARTED = time.perf_counter()
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # gradio reads it on import: set it first

import argparse
import copy
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import cv2
import gradio as gr
import torch
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError

from ferkit import cli, onnx_graph, synthetic, video
from ferkit.detect import DEFAULT_DETECTOR, DETECTORS
from ferkit.inference import ONE_FACE_TTA, TTA_CHOICES, Predictor, annotate, choose_models, log, log_graph, \
    open_image

MAX_FILE_SIZE = "10mb"  # larger uploads are refused by Gradio before they reach the models
EXAMPLES_DIR = Path("runs/app-examples")  # ignored by git: the examples are drawn at start-up, never committed
PHOTO = Path(__file__).resolve().parent / "examples" / "astronaut.jpg"  # public domain: examples/README.md
PHOTO_FACE = (110, 20, 230, 160)  # the astronaut's head in PHOTO (left, top, right, bottom)
FACE_SIZED_SIDE = 128  # an image this small where no face is found is most likely a face crop itself
CHART_FACES = 6  # panels in the chart; the details list every face
SHOWN_SIDE = 1600  # the annotated image is sent back at most this large: a 9000-pixel PNG takes seconds
WEBCAM_EVERY = 0.2  # seconds between webcam frames sent: about what one busy CPU core keeps up with
WEBCAM_SIZE = {"video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}  # Gradio asks for 1920x1440
# Gradio's default theme loads a Google font from the internet; these come with every browser.
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class BadUpload(Exception):
    """A file the page cannot analyse, explained in words a visitor can act on."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_flags(p)
    p.add_argument("--tta", default=ONE_FACE_TTA, choices=TTA_CHOICES, help="the page's first choice, as in predict.py")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 opens it to the network")
    p.add_argument("--port", type=cli.positive(int), default=7860, help="port to serve on")
    p.add_argument("--examples", default=str(EXAMPLES_DIR), help="folder the example images are written to")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, choices=DETECTORS,
                   help="centerface (five landmarks, aligned crops) or haar (OpenCV's cascade), as in predict.py")
    onnx_graph.add_backend_flag(p)
    cli.add_device_flags(p, batch_size=64, batch_help="faces per forward pass")
    return p


def load_predictors(args):
    """({TTA: Predictor}, the TTA to offer first). The copies share the loaded networks and differ in .tta
    only, so one visitor's choice never changes what another visitor's request runs with."""
    choice = choose_models(args.checkpoints, args.ensemble, args.runs)
    log(f"models from {choice.source}: {', '.join(str(m.path) for m in choice.members)}")
    predictor = Predictor.from_choice(choice, "none", args.backend, args.device, args.batch_size, args.threads,
                                      precision=args.precision)
    log_graph(predictor)
    return tta_variants(predictor.use_detector(args.detector)), args.tta


def tta_variants(predictor):
    variants = {tta: copy.copy(predictor) for tta in TTA_CHOICES}
    for tta, variant in variants.items():
        variant.tta = tta
    return variants


def make_examples(folder):
    """Example rows [image, no detection]: synthetic faces drawn by synthetic.py, a group made of the real
    photograph's face at three sizes, and the photograph itself (copied beside them, so that the page
    serves them all from one folder). The detector, trained on photographs, misses the drawn happy face
    (an example for 'no detection'); the group's largest face is not the leftmost, so the chart's order
    differs from the image's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    synthetic.save_face(folder / "happy.png", "happy")
    synthetic.save_face(folder / "surprise.png", "surprise")
    with Image.open(PHOTO) as photo:
        face = photo.convert("L").crop(PHOTO_FACE)
    group, x = Image.new("L", (640, 320), 128), 20
    for side in (160, 240, 120):
        group.paste(face.resize((side, side), Image.Resampling.BILINEAR), (x, (group.height - side) // 2))
        x += side + 20
    group.save(folder / "group.png")
    shutil.copyfile(PHOTO, folder / PHOTO.name)
    return [[str(folder / "happy.png"), True], [str(folder / "surprise.png"), False],
            [str(folder / "group.png"), False], [str(folder / PHOTO.name), False]]


def read_upload(upload):
    """The uploaded image, upright; BadUpload for anything that is not a usable image. `upload` is
    Gradio's file record, unprocessed: Gradio's own decoding would fail on such files with its own
    error, before this code could say what is wrong."""
    path = (upload or {}).get("path")
    if not path:
        raise BadUpload("Upload, paste or pick an example image first.")
    if os.path.getsize(path) == 0:
        raise BadUpload("The file is empty (0 bytes). Upload it again, or pick another.")
    try:
        return open_image(path)[0]
    except UnidentifiedImageError:
        raise BadUpload("This file is not an image this page can read (another kind of file renamed?). "
                        "Upload a JPEG, PNG, WebP, BMP or GIF.") from None
    except (Image.DecompressionBombError, ValueError) as error:  # ValueError: data.check_pixel_limit's
        raise BadUpload(f"The image is too large to analyse: {error}. Scale it down and try again.") from None
    except Exception as error:  # PIL raises many types for truncated and corrupt files
        raise BadUpload(f"The image cannot be used ({type(error).__name__}: {error}). "
                        "It may be truncated or damaged.") from None


def chart(faces):
    """Every emotion's probability as bars, one panel per face, in the faces' order (largest first)."""
    shown = faces[:CHART_FACES]
    # Figure rather than pyplot: pyplot keeps global state that concurrent requests would share.
    figure = Figure(figsize=(6, 0.5 + 2 * len(shown)), layout="constrained")
    for number, (face, axes) in enumerate(zip(shown, figure.subplots(len(shown), 1, squeeze=False)[:, 0]), 1):
        bars = axes.barh(list(face["probabilities"]), list(face["probabilities"].values()), color="#e84a4a")
        axes.bar_label(bars, [f"{100 * p:.0f}%" for p in face["probabilities"].values()], padding=2, fontsize=8)
        axes.set_xlim(0, 1.1)
        axes.invert_yaxis()  # classes read top to bottom, as listed
        axes.set_title(f"face {number}: {face['top'][0]['emotion']}", fontsize=10)  # centred: the label hides the left
    return figure


def analyse(predictors, upload, tta, no_detect):
    """The Photo tab: (annotated image, chart, status line, face records, largest face first). Problems a
    visitor can fix show in the status line and a notice, never as a traceback."""
    if upload is None:  # the image was cleared: clear the answer too
        return None, None, "", []
    started = time.perf_counter()
    try:
        image = read_upload(upload)
    except BadUpload as problem:
        gr.Warning(str(problem))
        return None, None, str(problem), []
    picture, faces = annotate(predictors[tta], image, detect=not no_detect)
    whole = not faces and not no_detect and max(image.size) <= FACE_SIZED_SIDE
    if whole:
        picture, faces = annotate(predictors[tta], image, detect=False)
    picture.thumbnail((SHOWN_SIDE, SHOWN_SIDE))  # boxes and labels are drawn at full size, then scaled with it
    seconds = time.perf_counter() - started
    if not faces:
        status = (f"No face found ({seconds:.2f} s). If the image is already a cropped face, "
                  "tick 'No detection'.")
        gr.Warning(status)
        return picture, None, status, []
    return picture, chart(faces), status_line(faces, seconds, whole, image.size), faces


def status_line(faces, seconds, whole, size):
    """The Photo tab's line for an answer with faces; whole: no face was found, so the image of `size` was
    classified as one face."""
    if whole:
        return (f"No face found, and the image is face-sized ({size[0]}x{size[1]}): classified whole, as one "
                f"face, in {seconds:.2f} s")
    more = f"; the chart shows the largest {CHART_FACES}" if len(faces) > CHART_FACES else ""
    return f"{len(faces)} face{'s' if len(faces) > 1 else ''} found in {seconds:.2f} s{more}"


def webcam_frame(predictors, frame, session, tta, no_detect):
    """One webcam frame (RGB) through video.py's per-frame steps: faces followed from frame to frame
    (looked for every few frames while nothing changes), each one's probabilities smoothed, then drawn.
    `session` (gr.State) holds one visitor's tracks. Returns (annotated frame, session, status line)."""
    if frame is None:
        return None, session, ""
    started = time.perf_counter()
    session = session or video.new_session()
    predictor = predictors[tta]
    options = SimpleNamespace(no_detect=no_detect, detect_side=video.DETECT_SIDE, detect_every=video.DETECT_EVERY,
                              smoothing=video.SMOOTHING)
    video.track_faces(predictor, cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), session, options)
    picture = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)  # video.py draws in OpenCV's colour order
    for track in session["tracks"]:
        video.draw_track(picture, track, predictor.classes)
    milliseconds = 1000 * (time.perf_counter() - started)
    status = f"{len(session['tracks'])} face(s); {milliseconds:.0f} ms for this frame"
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB), session, status


def build_app(predictors, tta="none", examples=()):
    """The page: shared controls, a Photo tab and a Webcam tab."""
    with gr.Blocks(title="Facial emotion recognition", analytics_enabled=False) as demo:
        gr.Markdown("# Facial emotion recognition\nEvery face found in the image, numbered largest first, "
                    "with the probability of each of the seven emotions. Images stay on this machine.")
        with gr.Row():
            tta_choice = gr.Radio(TTA_CHOICES, value=tta, label="Test-time augmentation",
                                  info="flip, centre-3, centre-full, tencrop and tencrop-full average the views: "
                                       "steadier, 2x, 3x, 4x, 10x and 12x slower")
            no_detect = gr.Checkbox(label="No detection (already a face crop)",
                                    info="treat the whole image as one face")
        with gr.Tab("Photo"):
            with gr.Row():
                with gr.Column():
                    photo = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Photo")
                    button = gr.Button("Find emotions", variant="primary")
                    shown = gr.Examples(examples, [photo, no_detect], label="Examples") if examples else None
                with gr.Column():
                    annotated = gr.Image(label="Faces found", type="pil", format="png", interactive=False,
                                         elem_id="annotated")
                    status = gr.Textbox(label="Result", interactive=False, elem_id="status")
                    plot = gr.Plot(label="Probabilities per face", format="png", elem_id="chart")
                    with gr.Accordion("Details", open=False):
                        details = gr.JSON(label="Faces, largest first")
            # preprocess=False: read_upload opens the file itself, to explain bad files in plain words.
            # One concurrency group for both tabs: requests take turns on the shared models and detector.
            answer = dict(fn=partial(analyse, predictors), inputs=[photo, tta_choice, no_detect],
                          outputs=[annotated, plot, status, details], preprocess=False, concurrency_id="models",
                          concurrency_limit=1)
            # upload, not change: the browser fires change twice for a file it cannot show.
            gr.on([button.click, photo.upload, photo.clear, tta_choice.change, no_detect.change], api_name="analyse",
                  trigger_mode="always_last", **answer)
            if shown:
                shown.load_input_event.then(api_visibility="private", **answer)
        with gr.Tab("Webcam"):
            with gr.Row():
                camera = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam",
                                  webcam_options=gr.WebcamOptions(constraints=WEBCAM_SIZE))
                live = gr.Image(label="Faces, followed and smoothed", interactive=False)
            live_status = gr.Textbox(label="Stream", interactive=False, elem_id="stream")
            session = gr.State(None)
            camera.stream(partial(webcam_frame, predictors), [camera, session, tta_choice, no_detect],
                          [live, session, live_status], stream_every=WEBCAM_EVERY, api_name="webcam",
                          concurrency_id="models", concurrency_limit=1)
    return demo


def launch(demo, host="127.0.0.1", port=7860):
    """Serve `demo` in the background with the limits and looks every copy gets, tests' too; its URL.
    No run history: it would keep visitors' photos in their browser's storage."""
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                                max_file_size=MAX_FILE_SIZE, theme=gr.themes.Default(**THEME_FONTS),
                                footer_links=["api", "settings"], run_history=False)  # no 'built with', a link out
    except OSError as error:  # Gradio's message for a port in use
        raise cli.UsageError(f"cannot serve on {host}:{port} ({error}); pass another --port") from None
    return url


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    predictors, tta = load_predictors(args)
    demo = build_app(predictors, tta, make_examples(args.examples))
    url = launch(demo, args.host, args.port)
    print(f"Browser demo on {url} (ready {time.perf_counter() - STARTED:.1f} s after start; Ctrl-C stops it)",
          flush=True)
    demo.block_thread()


if __name__ == "__main__":
    cli.run(main)
