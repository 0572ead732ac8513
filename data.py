"""Load a split of a facial-expression data set as uint8 tensors in memory, decoding images once.

    split = load_split("../shared/data/fer2013", "val")
    split.images  # uint8 [N, 1, 48, 48]
    split.labels  # int64 [N], indices into split.classes
    split.classes # canonical class names, e.g. ['angry', 'disgust', ..., 'surprise']

Sources: a folder with one folder per class (optionally under train/val/test split folders, in any of
the Kaggle layouts), a FER-2013 CSV file (`fer2013.csv` or `icml_face_data.csv`), or `synthetic`.
Decoded folders are cached under `.cache/`, keyed by the file list, sizes and modification times.

The last section, "Training augmentation", augments whole batches of these images on their device.
"""
import csv
import hashlib
import json
import math
import os
import reprlib
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from ferkit import synthetic
from ferkit.files import safe_filename, write_atomic

IMAGE_SIZE = 48
DEFAULT_CACHE_DIR = Path(os.environ.get("FER_CACHE_DIR", Path(__file__).resolve().parent / ".cache"))
CACHE_VERSION = 1
VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0  # fixed, so train.py and evaluate.py carve the same validation set

CANONICAL_CLASSES = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise", "contempt"]
CLASS_ALIASES = {
    "anger": "angry", "disgusted": "disgust", "fearful": "fear", "happiness": "happy",
    "sadness": "sad", "surprised": "surprise", "suprise": "surprise",
}
SPLIT_ALIASES = {
    "train": {"train", "training"},
    "val": {"val", "valid", "validation", "publictest"},
    "test": {"test", "testing", "privatetest"},
}
# FER-2013 CSV label order (Goodfellow et al. 2013), and its Usage column's split names.
CSV_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
CSV_USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}

# PIL only warns between 1x and 2x its pixel limit; check_pixel_limit enforces the limit itself.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class DataError(Exception):
    """A problem with the user's data, explained in terms of their files."""


class Split(NamedTuple):
    images: torch.Tensor  # uint8 [N, 1, 48, 48]
    labels: torch.Tensor  # int64 [N]
    classes: list


def canonical_class(name):
    name = name.strip().lower()
    return CLASS_ALIASES.get(name, name)


def ordered_classes(names):
    """Known emotions in canonical order, then any others alphabetically."""
    known = [c for c in CANONICAL_CLASSES if c in names]
    return known + sorted(set(names) - set(known))


def split_name(folder_name):
    for split, aliases in SPLIT_ALIASES.items():
        if folder_name.lower() in aliases:
            return split
    return None


def visible_entries(folder):
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)


def unwrap(folder):
    """Kaggle archives often nest a folder in one of the same name (Training/Training/)."""
    while True:
        entries = visible_entries(folder)
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() == folder.name.lower():
            folder = Path(entries[0].path)
        else:
            return folder


def split_folders(root):
    """Map split name to folder; a folder of class folders alone is one split, named 'all'."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path {root} does not exist. Pass --data with a folder of class folders, "
                        "a FER-2013 CSV file, or 'synthetic'.")
    if not root.is_dir():
        raise DataError(f"data path {root} is a file but not a .csv; expected a folder of class folders "
                        "(angry/, happy/, ...) or a FER-2013 CSV file.")
    root = unwrap(root)
    folders = {}
    for entry in visible_entries(root):
        if entry.is_dir() and split_name(entry.name):
            folders[split_name(entry.name)] = unwrap(Path(entry.path))
    if folders:
        return {split: folders[split] for split in SPLIT_ALIASES if split in folders}
    if not any(entry.is_dir() for entry in visible_entries(root)):
        raise DataError(f"{root} has no class folders: expected {root}/<class>/<image> "
                        "(for example angry/, happy/) or split folders train/, val/, test/.")
    return {"all": root}


def class_folders(split_folder):
    """{canonical class: [folders]} for the class folders that hold at least one entry, and the
    empty class folders."""
    found, empty = {}, []
    for entry in visible_entries(split_folder):
        if entry.is_dir() and visible_entries(entry.path):
            found.setdefault(canonical_class(entry.name), []).append(entry.path)
        elif entry.is_dir():
            empty.append(entry.path)
    return found, empty


def list_image_files(split_folder, classes):
    """[(path, size, mtime_ns, class index)] for every file, and the entries that cannot be read."""
    listing, unreadable = [], []
    for name, folders in class_folders(split_folder)[0].items():
        for folder in folders:
            for entry in visible_entries(folder):
                try:
                    stat = entry.stat()  # follows symlinks: a loop or a dangling link fails here
                    if not entry.is_dir():
                        listing.append((entry.path, stat.st_size, stat.st_mtime_ns, classes.index(name)))
                except OSError as error:
                    unreadable.append(f"{entry.path}: {error.strerror or error}")
    return listing, unreadable


def check_pixel_limit(image):
    """PIL only warns between 1x and 2x its decompression-bomb limit; enforce the limit itself."""
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"{image.width}x{image.height} exceeds PIL's decompression bomb limit "
                         f"of {Image.MAX_IMAGE_PIXELS} pixels")


def to_grayscale(image):
    """An 8-bit grayscale ('L') copy of any PIL image, 16-bit samples scaled rather than clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.max() > 255:
            pixels = pixels / 257.0
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image if image.mode == "L" else image.convert("L")


def decode_image(path):
    """Any image PIL reads, as a 48x48 grayscale uint8 array."""
    with Image.open(path) as image:
        check_pixel_limit(image)
        image.draft("L", (IMAGE_SIZE, IMAGE_SIZE))  # JPEG: decode at reduced scale, much faster
        image = to_grayscale(image)
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def try_decode(path):
    try:
        return decode_image(path), None
    except Exception as error:  # PIL raises many types for bad files; each is a skip, not a crash
        return None, f"{path}: {type(error).__name__}: {error}"


def decode_files(paths, threads, description):
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(tqdm(pool.map(try_decode, paths, chunksize=64), total=len(paths),
                            desc=description, unit="img", leave=False, disable=len(paths) < 1000))
    return results


def warn(message):
    # A file name that is not UTF-8 holds lone surrogates, which a UTF-8 (strict) stdout refuses to print.
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(f"warning: {message}".encode(encoding, "backslashreplace").decode(encoding), flush=True)


def report_skipped(skipped, where):
    for line in skipped[:20]:
        warn(f"skipped {line}")
    if len(skipped) > 20:
        warn(f"... and {len(skipped) - 20} more")
    if skipped:
        warn(f"skipped {len(skipped)} unreadable file(s) in {where}")


def cache_path(cache_dir, folder, split, key):
    folder = Path(folder).resolve()
    folder_id = hashlib.sha256(os.fsencode(folder)).hexdigest()[:8]  # a path need not be UTF-8
    return Path(cache_dir) / f"{safe_filename(folder.name, 40)}-{folder_id}-{split}-{key[:16]}.npz"


def checksum(images, labels):
    return zlib.crc32(labels.tobytes(), zlib.crc32(images.tobytes()))


def read_cache(path):
    """The cached arrays, or None (with a warning) when the file is missing, corrupt or stale."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            images, labels = cached["images"], cached["labels"]
            classes, skipped = cached["classes"].tolist(), cached["skipped"].tolist()
            if int(cached["checksum"]) != checksum(images, labels) or len(images) != len(labels):
                raise ValueError("checksum mismatch")
        return images, labels, classes, skipped
    except Exception as error:  # a truncated zip raises any of several types
        warn(f"cache file {path} is corrupt ({type(error).__name__}: {error}); rebuilding it")
        path.unlink(missing_ok=True)
        return None


def write_cache(path, images, labels, classes, skipped):
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.npz"):
        stale.unlink(missing_ok=True)
    write_atomic(path, lambda file: np.savez(
        file, images=images, labels=labels, classes=np.array(classes, dtype=str),
        skipped=np.array(skipped, dtype=str), checksum=np.array(checksum(images, labels))))


def load_folder_split(folder, classes, split, cache_dir, threads):
    listing, unreadable = list_image_files(folder, classes)
    # Paths relative to the folder: the same data reached by another path shares the cache.
    relative = [(os.path.relpath(path, folder), size, mtime, label) for path, size, mtime, label in listing]
    key_source = json.dumps([CACHE_VERSION, IMAGE_SIZE, classes, relative, len(unreadable)]).encode()
    path = cache_path(cache_dir, folder, split, hashlib.sha256(key_source).hexdigest())
    cached = read_cache(path)
    if not listing:
        raise DataError(f"{folder} holds no files in its class folders; expected {folder}/<class>/<image>")
    if cached is None:
        results = decode_files([item[0] for item in listing], threads, f"decoding {folder}")
        kept = [i for i, (pixels, _) in enumerate(results) if pixels is not None]
        skipped = unreadable + [error for pixels, error in results if error]
        if not kept:
            raise DataError(f"none of the {len(listing)} files in {folder} could be read as an image")
        images = np.stack([results[i][0] for i in kept])
        labels = np.array([listing[i][3] for i in kept], dtype=np.int64)
        write_cache(path, images, labels, classes, skipped)
    else:
        images, labels, _, skipped = cached
    report_skipped(skipped, folder)
    return images, labels


def bytes_not_utf8(text):
    """None for text read from valid UTF-8; else the bytes around the first byte that was not UTF-8 (a
    spreadsheet's Latin-1). Read with errors="surrogateescape", such bytes come back as lone surrogates,
    which cannot be encoded."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as error:
        return text[max(0, error.start - 20):error.start + 20].encode("utf-8", "surrogateescape")


def csv_columns(path, header):
    """Indices of the emotion, pixels and Usage columns, from the header row."""
    names = [name.strip().lower() for name in header]
    missing = [name for name in ("emotion", "pixels", "usage") if name not in names]
    if missing:
        text = ",".join(header)
        # A UTF-16 file (another spreadsheet export) reads as NULs and lone surrogates.
        hint = (" The header row is not UTF-8 text: save the file as 'CSV UTF-8'."
                if "\x00" in text or bytes_not_utf8(text) else "")
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; "
                        f"expected a FER-2013 CSV with columns emotion, pixels, Usage.{hint}")
    return [names.index(name) for name in ("emotion", "pixels", "usage")]


def parse_row(row, columns, width, where):
    """(48x48 uint8 image, CSV label, split name) of one data row."""
    if len(row) != width:
        raise DataError(f"{where}: {len(row)} fields, expected {width}")
    emotion, pixels, usage = (row[i] for i in columns)
    for column, cell in (("emotion", emotion), ("pixels", pixels), ("Usage", usage)):
        # Only the fields used are checked: bytes that are not UTF-8 in an extra column do no harm.
        bad = bytes_not_utf8(cell)
        if bad:
            raise DataError(f"{where}: {column} {bad!r} is not UTF-8 text (Latin-1 or Windows-1252?); "
                            "save the file as 'CSV UTF-8'")
    try:
        label = int(emotion)
    except ValueError:
        # reprlib shortens a long value: a quote left open makes the rest of the file one field.
        raise DataError(f"{where}: emotion {reprlib.repr(emotion)} is not a whole number") from None
    if not 0 <= label < len(CSV_CLASSES):
        raise DataError(f"{where}: emotion {label} is out of range 0..{len(CSV_CLASSES) - 1}")
    try:
        values = np.array(pixels.split(), dtype=np.int32)
    except (ValueError, OverflowError):  # OverflowError: a value beyond int32, such as 99999999999
        raise DataError(f"{where}: pixels must be whole numbers in 0..255 separated by spaces") from None
    if values.size != IMAGE_SIZE * IMAGE_SIZE or values.min() < 0 or values.max() > 255:
        raise DataError(f"{where}: expected {IMAGE_SIZE * IMAGE_SIZE} pixel values in 0..255, got {values.size}")
    split = CSV_USAGE.get(usage.strip().lower())
    if split is None:
        raise DataError(f"{where}: Usage {reprlib.repr(usage)} is not Training, PublicTest or PrivateTest")
    return values.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE), label, split


def parse_csv(path):
    """Every row of a FER-2013 CSV, as (images, labels in CSV order, split names)."""
    # utf-8-sig drops the BOM that Excel writes; surrogateescape reads bytes that are not UTF-8 without
    # an error, so that parse_row can name their row, or ignore them in a column that is not used.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
        reader = csv.reader(file)
        try:
            header = next(reader, [])
            columns = csv_columns(path, header)
            rows = [parse_row(row, columns, len(header), f"{path}, row {row_number}")
                    for row_number, row in enumerate(reader, start=2) if any(cell.strip() for cell in row)]
        except csv.Error as error:  # a field over csv's size limit: a quote left open swallowed the rows after it
            raise DataError(f"{path}, line {reader.line_num}: {error}; is a quote (\") left open?") from None
    if not rows:
        raise DataError(f"{path} has no data rows")
    images, labels, splits = zip(*rows)
    return np.stack(images), np.array(labels), np.array(splits)


def load_csv_split(path, split, cache_dir):
    """One split of a FER-2013 CSV; the first call parses the file and caches every split."""
    stat = path.stat()
    key_source = json.dumps([CACHE_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns]).encode()
    key = hashlib.sha256(key_source).hexdigest()
    cached = read_cache(cache_path(cache_dir, path, split, key))
    if cached is None:
        images, csv_labels, splits = parse_csv(path)
        classes = ordered_classes({CSV_CLASSES[label] for label in set(csv_labels.tolist())})
        to_index = np.array([classes.index(c) if c in classes else -1 for c in CSV_CLASSES])
        for name in SPLIT_ALIASES:
            rows = splits == name
            write_cache(cache_path(cache_dir, path, name, key), images[rows], to_index[csv_labels[rows]],
                        classes, [])
        cached = read_cache(cache_path(cache_dir, path, split, key))
    images, labels, classes, _ = cached
    if len(labels) == 0:
        raise DataError(f"{path} has no {split!r} rows (Usage column)")
    return images, labels, classes


def to_split(images, labels, classes):
    return Split(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1),
                 torch.from_numpy(labels.astype(np.int64)), list(classes))


def synthetic_per_class(source, split):
    """Images per class for 'synthetic' (default sizes) or 'synthetic:N' (N per class in train,
    N/5 in val and test); None when `source` is not synthetic."""
    name, _, count = str(source).partition(":")
    if name != "synthetic":
        return None
    if not count:
        return synthetic.SPLIT_SIZES[split]
    if not count.isdigit() or int(count) < 5:
        raise DataError(f"{source}: expected synthetic:N with N, the training images per class, at least 5")
    return int(count) if split == "train" else int(count) // 5


def available_splits(source):
    if synthetic_per_class(source, "train"):
        return ["train", "val", "test"]
    if str(source).lower().endswith(".csv"):
        return sorted(set(CSV_USAGE.values()))  # checked against the rows when loaded
    return list(split_folders(source))


def load_split(source, split, cache_dir=None, threads=None):
    """Load one split ('train', 'val' or 'test') of `source` as a Split of in-memory tensors."""
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    if split not in SPLIT_ALIASES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_ALIASES)}, not {split!r}")
    per_class = synthetic_per_class(source, split)
    if per_class:
        return to_split(*synthetic.render_split(split, per_class))
    if str(source).lower().endswith(".csv") and Path(source).is_file():
        return to_split(*load_csv_split(Path(source), split, cache_dir))
    folders = split_folders(source)
    if split not in folders and "all" not in folders:
        raise DataError(f"{source} has no {split!r} split folder; it has {', '.join(folders)}")
    classes = dataset_classes(folders)
    folder = folders.get(split, folders.get("all"))
    images, labels = load_folder_split(folder, classes, split, cache_dir, threads or os.cpu_count())
    return to_split(images, labels, classes)


def dataset_classes(folders):
    """The union of non-empty class folders over all splits, so every split shares one index."""
    names = set()
    for folder in folders.values():
        found, empty = class_folders(folder)
        names |= set(found)
        for path in empty:
            warn(f"class folder {path} is empty; leaving it out")
    if not names:
        raise DataError(f"no class folder under {', '.join(map(str, folders.values()))} holds any file")
    return ordered_classes(names)


def carve_validation(split, fraction=VALIDATION_FRACTION, seed=VALIDATION_SEED):
    """A stratified, seeded split of `split` into (train, validation)."""
    indices = np.arange(len(split.labels))
    labels = split.labels.numpy()
    try:
        train_idx, val_idx = train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single image cannot be stratified
        train_idx, val_idx = train_test_split(indices, test_size=fraction, random_state=seed)
    return subset(split, np.sort(train_idx)), subset(split, np.sort(val_idx))


def subset(split, indices):
    return Split(split.images[indices], split.labels[indices], split.classes)


def load_train_val(source, cache_dir=None, threads=None):
    """Training and validation splits; validation is carved from train when the data has none."""
    train = load_split(source, "train", cache_dir, threads)
    if "val" in available_splits(source):
        try:
            return train, load_split(source, "val", cache_dir, threads)
        except DataError as error:
            if not str(source).lower().endswith(".csv"):
                raise
            warn(f"{error}; carving validation from train instead")
    return carve_validation(train)


# ---------------------------------------------------------------------------------------------------
# Training augmentation, applied to a whole batch at once on the batch's device.
#
# Every geometric change (flips, rotation, random resized crop) is folded into one affine matrix per
# image and applied with a single `grid_sample`, so a batch costs a few tensor operations instead of
# hundreds of PIL calls. All randomness comes from the `generator` passed in: same seed, same batch,
# same result.
# ---------------------------------------------------------------------------------------------------

# train.py's defaults for its augmentation flags (README, "Accuracy", says what they were chosen on).
AUGMENTATION_DEFAULTS = dict(hflip=0.5, vflip=0.0, rotation=10.0, crop_scale=0.8, brightness=0.2, contrast=0.2,
                             erasing=0.25, train_size=None)


def augmentation_settings(args):
    """augment_batch's keyword arguments from parsed flags (or a run's saved config)."""
    return {key: getattr(args, key) for key in AUGMENTATION_DEFAULTS}


def uniform(low, high, size, generator, device):
    return low + (high - low) * torch.rand(size, generator=generator, device=device)


def random_affine(batch, generator, hflip, vflip, rotation, crop_scale, window=1.0):
    """[B, 2, 3] matrices mapping output to input coordinates in [-1, 1]. window < 1: the output is a random
    window of that fraction of the side, cut from the crop at the scale a full-size output would have."""
    device = generator.device
    area = uniform(crop_scale, 1.0, batch, generator, device)
    max_log_ratio = math.log(4 / 3) if crop_scale < 1 else 0.0  # no crop: keep the aspect ratio too
    log_ratio = uniform(-max_log_ratio, max_log_ratio, batch, generator, device)
    width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0) * window
    height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0) * window
    center_x = uniform(-1.0, 1.0, batch, generator, device) * (1 - width)
    center_y = uniform(-1.0, 1.0, batch, generator, device) * (1 - height)
    angle = torch.deg2rad(uniform(-rotation, rotation, batch, generator, device))
    flip_x = torch.where(torch.rand(batch, generator=generator, device=device) < hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(batch, generator=generator, device=device) < vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([
        torch.stack([width * cos * flip_x, -height * sin * flip_y, center_x], dim=1),
        torch.stack([width * sin * flip_x, height * cos * flip_y, center_y], dim=1),
    ], dim=1)


def random_erasing(images, generator, probability, area=(0.02, 0.25), log_ratio=(-1.2, 1.2)):
    """Replace one random rectangle per chosen image with noise (Zhong et al. 2017)."""
    batch, _, rows, cols = images.shape
    device = images.device
    chosen = torch.rand(batch, generator=generator, device=device) < probability
    erase_area = uniform(*area, batch, generator, device)
    ratio = uniform(*log_ratio, batch, generator, device).exp()
    height = (torch.sqrt(erase_area * ratio) * rows).clamp(1, rows)
    width = (torch.sqrt(erase_area / ratio) * cols).clamp(1, cols)
    top = torch.rand(batch, generator=generator, device=device) * (rows - height)
    left = torch.rand(batch, generator=generator, device=device) * (cols - width)
    ys = torch.arange(rows, device=device).view(1, rows, 1)
    xs = torch.arange(cols, device=device).view(1, 1, cols)
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + height).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + width).view(-1, 1, 1)) & chosen.view(-1, 1, 1))
    noise = torch.rand(images.shape, generator=generator, device=device, dtype=images.dtype)
    return torch.where(inside.unsqueeze(1), noise, images)


def augment_batch(images, generator, hflip=AUGMENTATION_DEFAULTS["hflip"], vflip=AUGMENTATION_DEFAULTS["vflip"],
                  rotation=AUGMENTATION_DEFAULTS["rotation"], crop_scale=AUGMENTATION_DEFAULTS["crop_scale"],
                  brightness=AUGMENTATION_DEFAULTS["brightness"], contrast=AUGMENTATION_DEFAULTS["contrast"],
                  erasing=AUGMENTATION_DEFAULTS["erasing"], train_size=AUGMENTATION_DEFAULTS["train_size"]):
    """Augment float images [B, 1, H, W] in [0, 1]; returns a new tensor in the same range, of the same shape
    or, with train_size, [B, 1, train_size, train_size].

    hflip, vflip, erasing: probabilities per image. rotation: maximum degrees either way.
    crop_scale: smallest area fraction kept by the random resized crop (1 = no crop).
    brightness, contrast: maximum relative change either way (0 = off).
    train_size: the side of a random square window of the augmented image, at its scale (None = the whole).
    """
    batch, channels, rows, cols = images.shape
    side = train_size or rows
    if hflip or vflip or rotation or crop_scale < 1 or side != rows:
        theta = random_affine(batch, generator, hflip, vflip, rotation, crop_scale, window=side / rows)
        grid = F.affine_grid(theta.to(images.dtype), [batch, channels, side, side * cols // rows],
                             align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if brightness or contrast:
        shape = (batch, 1, 1, 1)
        gain = uniform(1 - brightness, 1 + brightness, shape, generator, images.device)
        spread = uniform(1 - contrast, 1 + contrast, shape, generator, images.device)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * spread + mean) * gain
        images = images.clamp(0, 1)
    if erasing:
        images = random_erasing(images, generator, erasing)
    return images
