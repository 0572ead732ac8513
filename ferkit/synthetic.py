"""Synthetic 48x48 grayscale faces for the seven FER-2013 expressions, deterministic from a seed.

They let the main command run offline on a fresh machine and give tests a learnable signal. Each
face varies in identity (face shape, skin tone, eye spacing, hair), pose (rotation, shift, scale),
lighting and noise; the expression lives in the eyebrows, eyes, nose and mouth, drawn at a random
intensity so that weak expressions overlap with neutral and the task is not trivially separable.

    python synthetic.py --out runs/synthetic_samples.png   # a grid of samples per class
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
SPLIT_SIZES = {"train": 300, "val": 60, "test": 60}  # images per class
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
CANVAS = 96  # drawn at twice the size, then downsampled: smooth edges

# Per class: brow height above the eyes, inner-brow drop (+ lowered/angry, - raised/sad),
# eye openness, and mouth shape. Values are the full-intensity expression.
EXPRESSIONS = {
    "angry": dict(brow_height=4, inner_drop=5, eye_open=0.7, mouth="pressed"),
    "disgust": dict(brow_height=5, inner_drop=3, eye_open=0.5, mouth="sneer"),
    "fear": dict(brow_height=10, inner_drop=-3, eye_open=1.5, mouth="stretched"),
    "happy": dict(brow_height=7, inner_drop=0, eye_open=0.75, mouth="smile"),
    "neutral": dict(brow_height=7, inner_drop=0, eye_open=1.0, mouth="flat"),
    "sad": dict(brow_height=7, inner_drop=-5, eye_open=0.8, mouth="frown"),
    "surprise": dict(brow_height=12, inner_drop=0, eye_open=1.7, mouth="open"),
}
NEUTRAL = EXPRESSIONS["neutral"]


def draw_mouth(draw, shape, x, y, width, strength, color):
    curve = 2 + 8 * strength
    if shape == "smile":
        draw.arc([x - width, y - curve, x + width, y + curve], 10, 170, fill=color, width=3)
    elif shape == "frown":
        draw.arc([x - width, y, x + width, y + 2 * curve], 190, 350, fill=color, width=3)
    elif shape == "open":
        draw.ellipse([x - 5 - 3 * strength, y - 4 - 6 * strength, x + 5 + 3 * strength, y + 4 + 6 * strength],
                     fill=color)
    elif shape == "stretched":
        draw.ellipse([x - width - 4 * strength, y - 2 - 2 * strength, x + width + 4 * strength,
                      y + 2 + 2 * strength], fill=color)
    elif shape == "pressed":
        draw.line([x - width * 0.7, y + 2 * strength, x + width * 0.7, y + 2 * strength], fill=color,
                  width=int(3 + 2 * strength))
    elif shape == "sneer":
        draw.line([x - width, y + 2, x - 2, y - 4 * strength, x + width, y + 1], fill=color, width=3)
    else:
        draw.line([x - width, y, x + width, y], fill=color, width=3)


def render_face(rng, expression):
    """One face as a 48x48 uint8 array."""
    strength = rng.uniform(0.35, 1.0)
    mix = lambda key: NEUTRAL[key] + strength * (EXPRESSIONS[expression][key] - NEUTRAL[key])
    background = rng.uniform(20, 235)
    skin = rng.uniform(90, 225)
    feature = max(0.0, skin - rng.uniform(60, 110))  # eyes, brows and mouth darker than the skin
    image = Image.new("F", (CANVAS, CANVAS), float(background))
    draw = ImageDraw.Draw(image)
    cx, cy = CANVAS / 2, CANVAS / 2 + 4
    half_width, half_height = rng.uniform(24, 33), rng.uniform(31, 39)
    hair = rng.uniform(10, 120)
    draw.ellipse([cx - half_width - 3, cy - half_height - rng.uniform(3, 12), cx + half_width + 3,
                  cy + rng.uniform(-10, 10)], fill=float(hair))
    draw.ellipse([cx - half_width, cy - half_height, cx + half_width, cy + half_height], fill=float(skin))

    eye_y, eye_dx = cy - rng.uniform(6, 11), rng.uniform(10, 15)
    eye_h = 3.2 * mix("eye_open")
    brow_y = eye_y - mix("brow_height") - 3
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse([ex - 5, eye_y - eye_h, ex + 5, eye_y + eye_h], fill=float(min(255, skin + 40)))
        draw.ellipse([ex - 2.2, eye_y - min(eye_h, 2.2), ex + 2.2, eye_y + min(eye_h, 2.2)], fill=float(feature))
        inner, outer = ex - side * 5, ex + side * 6
        draw.line([inner, brow_y + mix("inner_drop"), outer, brow_y], fill=float(feature), width=3)

    nose_top, nose_bottom = eye_y + 3, eye_y + rng.uniform(14, 18)
    draw.line([cx, nose_top, cx - 2, nose_bottom, cx + 3, nose_bottom], fill=float(feature), width=2)
    if expression == "disgust":  # wrinkles across the bridge of the nose
        for k in range(2):
            y = nose_top + 3 + 3 * k
            draw.line([cx - 4 * strength - 2, y, cx + 4 * strength + 2, y], fill=float(feature), width=1)

    mouth_y = nose_bottom + rng.uniform(7, 11)
    draw_mouth(draw, EXPRESSIONS[expression]["mouth"] if strength > 0.45 else "flat", cx, mouth_y,
               rng.uniform(7, 11), strength, float(feature))

    scale = rng.uniform(1.0, 1.25)  # zoom in only: the crop must stay on the canvas
    image = image.rotate(rng.uniform(-12, 12), Image.Resampling.BILINEAR,
                         translate=tuple(rng.uniform(-5, 5, size=2)), fillcolor=float(background))
    crop = CANVAS / 2 / scale
    image = image.resize((48, 48), Image.Resampling.BILINEAR,
                         box=(CANVAS / 2 - crop, CANVAS / 2 - crop, CANVAS / 2 + crop, CANVAS / 2 + crop))
    pixels = np.asarray(image, dtype=np.float32)
    angle, gain = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.35)
    ys, xs = np.mgrid[-1:1:48j, -1:1:48j]
    pixels = pixels * (1 + gain * (np.cos(angle) * xs + np.sin(angle) * ys))
    pixels = pixels + rng.normal(0, rng.uniform(3, 14), size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_split(split, per_class=None, seed=0):
    """(images uint8 [N, 48, 48], labels int64 [N], class names) with classes interleaved.

    Image i depends only on (seed, split, i), so a larger set starts with the smaller one.
    """
    count = len(CLASSES) * (per_class or SPLIT_SIZES[split])
    labels = np.arange(count) % len(CLASSES)
    images = np.stack([render_face(np.random.default_rng([seed, SPLIT_IDS[split], i]), CLASSES[labels[i]])
                       for i in range(count)])
    return images, labels.astype(np.int64), list(CLASSES)


def save_sample_grid(path, per_class=8, seed=0):
    """A PNG with one row per class, each face enlarged 2x, class names on the left."""
    images, labels, classes = render_split("train", per_class, seed)
    label_width, cell = 70, 96
    grid = Image.new("L", (label_width + per_class * cell, len(classes) * cell), 255)
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(classes):
        draw.text((4, row * cell + cell // 2 - 6), name, fill=0)
        for column, image in enumerate(images[labels == row]):
            face = Image.fromarray(image).resize((cell - 4, cell - 4), Image.Resampling.NEAREST)
            grid.paste(face, (label_width + column * cell + 2, row * cell + 2))
    grid.save(path)


def save_face(path, emotion, seed=0, scale=4):
    """One synthetic face of `emotion`, enlarged `scale` times: an input for predict.py --no-detect."""
    face = render_face(np.random.default_rng([seed, SPLIT_IDS["test"], CLASSES.index(emotion)]), emotion)
    Image.fromarray(face).resize((48 * scale, 48 * scale), Image.Resampling.BILINEAR).save(path)


def main():
    parser = argparse.ArgumentParser(description="Save a grid of synthetic faces, one row per class, or one face.")
    parser.add_argument("--out", default="runs/synthetic_samples.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=8, help="faces per class in the grid (default: %(default)s)")
    parser.add_argument("--face", choices=CLASSES, default=None,
                        help="write one enlarged face with this expression instead of the grid (default: the grid)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.face:
        save_face(args.out, args.face, args.seed)
    else:
        save_sample_grid(args.out, args.per_class, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
