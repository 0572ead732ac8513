"""A synthetic video clip for the tests and the speed benchmark: one synthetic face (synthetic.py),
scaled up, crossing the frame from left to right and changing expression halfway, written with
OpenCV. The face sits in a white frame, which lets a test find it without the Haar cascade (the
cascade was trained on photographs and finds these cartoon faces only now and then).
"""
import cv2
import numpy as np

from ferkit import synthetic

BACKGROUND = 40
BORDER = 3  # pixels of the white frame around the face


def face_picture(expression, side, seed=0):
    """A synthetic face with `expression`, as uint8 [side, side]."""
    faces = synthetic.render_split("test", 1, seed)[0]  # one face per class, in class order
    return cv2.resize(faces[synthetic.CLASSES.index(expression)], (side, side), interpolation=cv2.INTER_LINEAR)


def face_boxes(frames, size, face_side):
    """The face's (x, y, w, h) in each frame: left to right at constant speed, vertically centred."""
    width, height = size
    xs = np.linspace(BORDER, width - face_side - BORDER, frames).round().astype(int)
    return [(int(x), (height - face_side) // 2, face_side, face_side) for x in xs]


def background(size, textured, rng):
    """A plain dark wall, or a lit wall with noise that gives the cascade texture to reject."""
    width, height = size
    if not textured:
        return np.full((height, width), BACKGROUND, dtype=np.uint8)
    wall = np.linspace(60, 200, width)[None, :] + rng.normal(0, 15, (height, width))
    return np.clip(wall, 0, 255).astype(np.uint8)


def write_clip(path, frames=30, size=(320, 240), fps=25.0, face_side=None, expressions=("happy", "sad"),
               textured=False, fourcc="MJPG", seed=0):
    """Write the clip to `path` (the fourcc must suit its extension); returns the face box per frame."""
    face_side = face_side or min(size) // 2
    pictures = [face_picture(e, face_side, seed) for e in expressions]
    boxes = face_boxes(frames, size, face_side)
    wall = background(size, textured, np.random.default_rng(seed))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {fourcc} video to {path}")
    try:
        for index, (x, y, w, h) in enumerate(boxes):
            frame = wall.copy()
            cv2.rectangle(frame, (x - BORDER, y - BORDER), (x + w + BORDER - 1, y + h + BORDER - 1), 255, -1)
            frame[y:y + h, x:x + w] = pictures[index * len(pictures) // frames]
            writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    finally:
        writer.release()
    return boxes


def find_framed_face(gray):
    """[(x, y, w, h)] of the white frame around the face in `gray`, a frame of the clip at any scale:
    what tests and the benchmark use where the Haar cascade finds no face. The frame is the largest
    patch of near-white pixels; the textured wall has only a few scattered ones."""
    count, _, stats, _ = cv2.connectedComponentsWithStats((gray > 230).astype(np.uint8))
    if count < 2:
        return []
    x, y, w, h, _ = stats[1 + np.argmax(stats[1:, cv2.CC_STAT_AREA])]
    return [(int(x), int(y), int(w), int(h))]
