"""app.py, the browser demo: the answer it shares with predict.py, the page's messages for files it cannot
use, the webcam's tracking and smoothing, the served app called over HTTP with gradio_client, and the page
in a real browser (headless Chromium driven by Playwright; skipped, saying how to install it, where absent)."""
import importlib.util
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

import numpy as np
import pytest
from PIL import Image

if importlib.util.find_spec("gradio") is None:  # find_spec: gradio must not be imported before app sets it up
    pytest.skip("the browser demo's packages are missing: pip install -r requirements-app.txt",
                allow_module_level=True)
import app  # noqa: E402  before anything imports gradio: app turns gradio's analytics off first
from ferkit import cli  # noqa: E402
from ferkit import inference  # noqa: E402
import predict  # noqa: E402
from ferkit import synthetic  # noqa: E402
from ferkit import video  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
INSTALL_BROWSER = ("install Chromium to run it: apt-get install -y chromium (Debian; .ci/run does this), and "
                   "pip install -r requirements-app.txt for Playwright")
pytestmark = [pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # pandas 3 deprecations in gradio
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]  # the "large" bad file


@pytest.fixture(scope="module")
def predictors(trained_runs):
    predictor = inference.Predictor.from_ensemble(trained_runs / "evaluation" / "ensemble.json", device="cpu",
                                                  precision="fp32")
    return app.tta_variants(predictor)


@pytest.fixture(scope="module")
def example_rows(tmp_path_factory):
    return app.make_examples(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def examples(example_rows):
    """{name: path} of the examples app.py writes at start-up."""
    return {name: next(row[0] for row in example_rows if row[0].endswith(f"{name}.png")) for name in ("happy", "group")}


def face_image(emotion="happy", side=192):
    index = synthetic.CLASSES.index(emotion)
    return Image.fromarray(synthetic.render_split("test", 1)[0][index]).resize((side, side))


def huge_png(path, side=20000):
    """A PNG whose header says side x side pixels; only its first row is there."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(side + 1)))
                     + chunk(b"IEND", b""))
    return path


def bad_file(folder, kind):
    path = folder / f"{kind}.jpg"
    if kind == "text":
        path.write_text("not a picture, renamed\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge":  # PIL refuses it on opening
        huge_png(path)
    elif kind == "large":  # PIL only warns; data.check_pixel_limit refuses it
        huge_png(path, side=10_000)
    elif kind == "truncated":
        face_image().save(folder / "whole.png")
        path.write_bytes((folder / "whole.png").read_bytes()[:-2000])
    return path


MESSAGES = {"text": "not an image this page can read", "empty": "empty (0 bytes)",
            "huge": "too large to analyse", "large": "too large to analyse", "truncated": "truncated or damaged"}


def test_annotate_is_predict_py_s_answer_largest_face_first(predictors, examples, trained_runs):
    image = inference.open_image(examples["group"])[0]
    picture, faces = inference.annotate(predictors["none"], image)
    assert picture.mode == "RGB" and picture.size == image.size
    areas = [face["box"][2] * face["box"][3] for face in faces]
    assert len(faces) == 3 and areas == sorted(areas, reverse=True) and faces[0]["box"][0] > faces[1]["box"][0]
    ensemble_file = str(trained_runs / "evaluation" / "ensemble.json")
    records = predict.main([examples["group"], "--ensemble", ensemble_file, "--json", "--precision", "fp32",
                            "--threads", "1"])
    by_box = {tuple(face["box"]): face for face in records[0]["faces"]}
    for face in faces:
        assert by_box[tuple(face["box"])]["probabilities"] == pytest.approx(face["probabilities"], abs=2e-3)
        assert sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-3)
        x, y, w, h = face["box"]
        assert picture.getpixel((x, y + h // 2)) == (255, 40, 40)  # the box's left edge, drawn by draw_faces


def test_no_detection_makes_the_whole_image_one_face(predictors):
    picture, faces = inference.annotate(predictors["flip"], face_image(side=96), detect=False, top_k=2)
    assert [face["box"] for face in faces] == [[0, 0, 96, 96]] and len(faces[0]["top"]) == 2


@pytest.mark.parametrize("kind", MESSAGES)
def test_a_file_that_is_no_usable_image_gets_a_message(predictors, tmp_path, monkeypatch, kind):
    notices = []
    monkeypatch.setattr(app.gr, "Warning", notices.append)
    picture, plot, status, faces = app.analyse(predictors, {"path": str(bad_file(tmp_path, kind))}, "none", False)
    assert picture is None and plot is None and faces == []
    assert MESSAGES[kind] in status and notices == [status] and "Traceback" not in status


def test_an_image_without_a_face_says_how_to_go_on(predictors, tmp_path, monkeypatch):
    monkeypatch.setattr(app.gr, "Warning", lambda message: None)
    Image.new("RGB", (300, 200), (90, 120, 150)).save(tmp_path / "wall.png")
    picture, plot, status, faces = app.analyse(predictors, {"path": str(tmp_path / "wall.png")}, "none", False)
    assert picture.size == (300, 200) and plot is None and faces == []
    assert status.startswith("No face found") and "No detection" in status


def test_webcam_frames_are_followed_and_smoothed_as_video_py_does(predictors):
    predictor, session = predictors["none"], None
    frames = [np.asarray(face_image(emotion).convert("RGB")) for emotion in ("happy", "sad", "surprise")]
    expected = None
    for frame in frames:
        crop = inference.crop_face(np.asarray(Image.fromarray(frame).convert("L")), (0, 0, 192, 192), 0)
        expected = video.smooth(expected, predictor.predict_faces(crop)[0], video.SMOOTHING)
        picture, session, status = app.webcam_frame(predictors, frame, session, "none", True)
        assert picture.shape == frame.shape and status.startswith("1 face(s)")
    [track] = session["tracks"]
    assert track.id == 1 and session["frame"] == 3
    np.testing.assert_allclose(track.probs, expected, atol=1e-4)


def test_the_demo_uses_the_shipped_ensemble_unless_told_otherwise(trained_runs, tmp_path, monkeypatch):
    ensemble_file = trained_runs / "evaluation" / "ensemble.json"
    monkeypatch.setattr(inference, "PRETRAINED", ensemble_file)  # stands in for weights/ensemble.json
    monkeypatch.chdir(tmp_path)  # a runs/ here must not change the default
    (tmp_path / "runs" / "model_x").mkdir(parents=True)
    shutil.copy(trained_runs / "model_x" / "best.pt", tmp_path / "runs" / "model_x" / "best.pt")
    assert app.build_parser().parse_args([]).backend == "auto"  # ONNX Runtime on a CPU, as predict.py
    args = app.build_parser().parse_args(["--device", "cpu", "--backend", "torch"])
    predictors, tta = app.load_predictors(args)
    assert sorted(predictors) == sorted(inference.TTA_CHOICES) and tta == inference.ONE_FACE_TTA
    assert [p.tta for p in predictors.values()] == list(predictors)
    assert len({id(p.forward) for p in predictors.values()}) == 1  # one copy of the networks
    assert predictors["none"].files == [m.path for m in inference.choose_models(ensemble_file=ensemble_file).members]
    args = app.build_parser().parse_args(["--checkpoints", "runs/model_x/best.pt", "--tta", "flip", "--backend", "torch"])
    predictors, tta = app.load_predictors(args)
    assert predictors["none"].files == [Path("runs/model_x/best.pt")] and tta == "flip"
    predictors, _ = app.load_predictors(app.build_parser().parse_args(["--runs", "runs", "--backend", "torch"]))
    assert predictors["none"].files == [Path("runs/model_x/best.pt")]


def test_a_face_sized_image_without_a_detected_face_is_classified_whole(predictors, tmp_path, monkeypatch):
    notices = []
    monkeypatch.setattr(app.gr, "Warning", notices.append)
    face_image("sad", side=96).save(tmp_path / "crop.png")
    assert inference.detect_faces(np.asarray(face_image("sad", side=96)), inference.load_cascade()) == []
    picture, plot, status, faces = app.analyse(predictors, {"path": str(tmp_path / "crop.png")}, "none", False)
    assert status.startswith("No face found, and the image is face-sized (96x96): classified whole, as one face")
    assert [face["box"] for face in faces] == [[0, 0, 96, 96]] and plot is not None and notices == []
    whole = predictors["none"].predict(tmp_path / "crop.png", detect=False)
    assert faces[0]["probabilities"] == whole[0]["probabilities"]
    Image.new("L", (200, 120), 128).save(tmp_path / "wall.png")  # larger than a face: told what to do instead
    _, plot, status, faces = app.analyse(predictors, {"path": str(tmp_path / "wall.png")}, "none", False)
    assert status.startswith("No face found") and "No detection" in status and faces == [] and plot is None


def test_the_examples_offer_the_real_photograph_beside_the_synthetic_faces(example_rows):
    photo = next(Path(path) for path, _ in example_rows if path.endswith("astronaut.jpg"))
    assert photo.read_bytes() == (Path(app.__file__).parent / "examples" / "astronaut.jpg").read_bytes()
    assert [no_detect for path, no_detect in example_rows if path == str(photo)] == [False]
    assert sum(path.endswith(".png") for path, _ in example_rows) == 3


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(predictors, example_rows):
    demo = app.build_app(predictors, "none", example_rows)
    url = app.launch(demo, port=free_port())
    yield url
    demo.close()


def test_the_served_app_answers_over_http_and_survives_bad_files(served, examples, tmp_path):
    from gradio_client import Client, handle_file
    client = Client(served, verbose=False)
    picture, plot, status, faces = client.predict(handle_file(examples["group"]), "none", False, api_name="/analyse")
    assert re.fullmatch(r"3 faces found in \d+\.\d\d s", status)
    assert Image.open(picture).size == Image.open(examples["group"]).size and plot
    assert [len(face["probabilities"]) for face in faces] == [7, 7, 7]
    assert all(sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-3) for face in faces)
    areas = [face["box"][2] * face["box"][3] for face in faces]
    assert areas == sorted(areas, reverse=True)
    for kind, message in MESSAGES.items():
        assert message in client.predict(handle_file(str(bad_file(tmp_path, kind))), "none", False,
                                         api_name="/analyse")[2]
    (tmp_path / "big.png").write_bytes(bytes(11 * 2 ** 20))  # over MAX_FILE_SIZE: refused on upload
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(tmp_path / "big.png")), "none", False, api_name="/analyse")
    _, _, status, faces = client.predict(handle_file(examples["happy"]), "flip", True, api_name="/analyse")
    assert status.startswith("1 face found") and faces[0]["box"] == [0, 0, 192, 192]  # still serving


def test_a_port_in_use_is_a_usage_error(predictors):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(cli.UsageError, match="pass another --port"):
            app.launch(app.build_app(predictors), port=taken.getsockname()[1])


def test_python_app_py_starts_and_prints_its_url(trained_runs, tmp_path):
    port = free_port()
    command = [sys.executable, "app.py", "--ensemble", str(trained_runs / "evaluation" / "ensemble.json"),
               "--port", str(port), "--examples", str(tmp_path / "examples"), "--threads", "1"]
    process = subprocess.Popen(command, cwd=Path(app.__file__).parent, stdout=subprocess.PIPE, text=True)
    try:
        started, line = time.perf_counter(), process.stdout.readline()
        assert line.startswith(f"Browser demo on http://127.0.0.1:{port}/"), line
        assert time.perf_counter() - started < 60  # about 7 s on a busy 2-core machine; generous for CI
        assert "Facial emotion recognition" in urlopen(f"http://127.0.0.1:{port}/").read().decode()
        assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == \
            ["astronaut.jpg", "group.png", "happy.png", "surprise.png"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_page_loads_nothing_from_other_hosts(served):
    page = urlopen(served).read().decode()
    assert "fonts.googleapis.com" not in page and "fonts.gstatic.com" not in page
    for source in re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', page):
        assert not urlparse(source).netloc, source  # og: meta tags and API examples name hosts; nothing loads them


def test_the_page_in_a_real_browser(served, examples, tmp_path):
    """Upload a photo, open the details, click an example, upload a text file, stream the fake webcam."""
    if CHROMIUM is None:
        pytest.skip(f"no Chromium for the real-browser test; {INSTALL_BROWSER}")
    sync_api = pytest.importorskip("playwright.sync_api", reason=INSTALL_BROWSER)
    expect = sync_api.expect
    with sync_api.sync_playwright() as playwright:
        # Chromium's fake camera (a moving test pattern) stands in for a webcam, allowed without asking.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            hosts = set()
            page.on("request", lambda request: hosts.add(urlparse(request.url).hostname))
            page.goto(served)
            status = page.locator("#status textarea")
            page.locator("input[type=file]").first.set_input_files(examples["group"])
            expect(status).to_have_value(re.compile(r"3 faces found in"), timeout=60_000)
            expect(page.locator("#annotated img")).to_be_visible()
            expect(page.locator("#chart img")).to_be_visible()
            page.get_by_text("Details").click()
            expect(page.get_by_text('"probabilities"').first).to_be_visible()
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            text = page.inner_text("body")
            assert all(emotion in text for emotion in synthetic.CLASSES)  # the details list every probability

            page.locator("[data-testid=dataset-cell-0-0]").click()  # the happy face, with 'no detection'
            expect(status).to_have_value(re.compile(r"1 face found in"), timeout=60_000)
            expect(page.get_by_label("No detection (already a face crop)")).to_be_checked()

            page.locator("input[type=file]").first.set_input_files(str(bad_file(tmp_path, "text")))
            expect(status).to_have_value(re.compile(MESSAGES["text"]), timeout=60_000)
            expect(page.get_by_text(MESSAGES["text"]).first).to_be_visible()  # the notice too
            page.screenshot(path=tmp_path / "bad-file.png", full_page=True)

            page.get_by_role("tab", name="Webcam").click()
            page.get_by_text("Click to Access Webcam").click()
            page.locator("button", has_text=re.compile(r"^\s*Record")).click()
            expect(page.locator("#stream textarea")).to_have_value(re.compile(r"face\(s\); \d+ ms"), timeout=60_000)
            page.screenshot(path=tmp_path / "webcam.png", full_page=True)
        finally:
            browser.close()
    assert hosts <= {"127.0.0.1", None}, hosts  # None: data: and blob: addresses
