"""Fuzzing, with Hypothesis, of every reader of user input: FER-2013 CSV files, image files, folder trees
and ensemble.json. Every outcome must be a successful load, a counted skip, or a DataError (UsageError for
ensemble.json) whose message names the file; no other exception may escape.

The examples are derandomized and few, so every run tries the same ones and takes seconds. Each failure
the fuzzing found is pinned by a plain regression test at the end of this file."""
import contextlib
import csv
import io
import json
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import data
import ensemble
import predict
from ferkit.cli import UsageError

# {reader: Counter of outcomes}: the examples each reader was fuzzed with, printed by the last test so
# that CI output shows how many ran and that they did not all end the same way.
OUTCOMES = defaultdict(Counter)
SPLITS = ["train", "val", "test"]


def fuzz(max_examples):
    """Few, derandomized examples, no example database written into the working tree. The autouse
    private_cache fixture (conftest.py) is function-scoped; sharing it between examples is harmless
    because every example passes its own cache_dir."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@contextlib.contextmanager
def scratch_folder():
    """A fresh folder per example: Hypothesis runs many examples in one test function call, so
    pytest's tmp_path would be shared, and a cache from one example could serve the next."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def quietly(load, *args, **kwargs):
    """(result, printed text) of `load`, printing to a stdout as strict as a UTF-8 terminal's, which
    refuses the lone surrogates that stand for file-name bytes that are not UTF-8."""
    printed = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    with contextlib.redirect_stdout(printed):
        result = load(*args, **kwargs)
    printed.seek(0)
    return result, printed.read()


def assert_sane(split):
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 48, 48)
    assert split.labels.dtype == torch.int64 and len(split.labels) == len(split.images) > 0
    assert 0 <= int(split.labels.min()) and int(split.labels.max()) < len(split.classes)


# FER-2013 CSV files.

USAGES = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
EXTRA_COLUMNS = ["id", "source", "Commentaire"]
TRICKY_CELLS = ["", " ", "-1", "7", "256", "3.0", "1e3", "nan", "\u0663", "99999999999", "9" * 5000,
                '"', "Training\x00", "Trainingé", "PublicTest,PrivateTest", "1\n2"]
PIXEL_VALUES = ["256", "-1", "99999999999", "1.5", "x", "", "\u0663", "0x1", "1_0"]
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16", "utf-16-le", "utf-32"]


def pixel_values(seed):
    return np.random.default_rng(seed).integers(0, 256, 48 * 48)


@st.composite
def fer_table(draw, text):
    """(header, rows, expected [(CSV label, split, pixel seed)]) of a valid FER-2013 table: its columns in
    any order and spelling, extra columns holding `text`, blank rows between the data rows."""
    columns = draw(st.permutations(["emotion", "pixels", "Usage",
                                    *draw(st.lists(st.sampled_from(EXTRA_COLUMNS), unique=True, max_size=2))]))
    header = [draw(st.sampled_from([name, name.upper(), f" {name} "])) for name in columns]
    rows, expected = [], []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            rows.append(draw(st.sampled_from([[], [""] * len(columns), [" "] * len(columns)])))
        label, usage, seed = draw(st.integers(0, 6)), draw(st.sampled_from(list(USAGES))), draw(st.integers(0, 9))
        cells = {"emotion": draw(st.sampled_from([str(label), f" {label}"])),
                 "pixels": " ".join(map(str, pixel_values(seed))),
                 "Usage": draw(st.sampled_from([usage, usage.lower(), f"{usage} "]))}
        rows.append([cells[name] if name in cells else draw(text) for name in columns])
        expected.append((label, USAGES[usage], seed))
    return header, rows, expected


def csv_text(header, rows, newline, quoting):
    text = io.StringIO()
    csv.writer(text, lineterminator=newline, quoting=quoting).writerows([header, *rows])
    return text.getvalue()


@st.composite
def valid_csv_files(draw):
    """(file bytes, expected rows) of a valid FER-2013 CSV as spreadsheets and scripts write it: UTF-8
    with or without a BOM, or Latin-1 with accented text in the extra columns only; LF or CRLF line
    endings; minimal or full quoting."""
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1"]))
    # A lone CR inside a field is not quoted by csv.writer when lines end in LF; no tool writes that.
    characters = st.characters(codec="latin-1" if encoding == "latin-1" else "utf-8", exclude_characters="\r")
    header, rows, expected = draw(fer_table(st.text(characters, max_size=12)))
    text = csv_text(header, rows, draw(st.sampled_from(["\n", "\r\n"])),
                    draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
    return text.encode(encoding), expected


@st.composite
def mutated_csv_files(draw):
    """Bytes that are mostly a FER-2013 CSV: cells replaced by odd values, a pixel value changed, a row
    made longer, the whole file in another encoding, then bytes flipped, inserted, deleted or cut off; or
    random bytes. Each mutation is drawn rarely enough that the others still reach the rows."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"", b"emotion,pixels,Usage\n"])) + draw(st.binary(max_size=200))
    header, rows, _ = draw(fer_table(st.text(max_size=12)))
    table, pixels = [header, *rows], [name.strip().lower() for name in header].index("pixels")
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        row = draw(st.sampled_from(table))
        if row:
            cell = draw(st.integers(0, len(row) - 1))
            row[cell] = draw(st.one_of(st.sampled_from(TRICKY_CELLS), st.text(max_size=12)))
    for row in rows:
        if len(row) > 2 and draw(st.integers(0, 3)) == 0:
            values = row[pixels].split() or [""]
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(PIXEL_VALUES))
            row[pixels] = " ".join(values)
        if len(row) > 2 and draw(st.integers(0, 5)) == 0:
            row.append(draw(st.text(max_size=5)))  # a row longer than the header
    text = csv_text(table[0], table[1:], draw(st.sampled_from(["\n", "\r\n", "\r"])),
                    draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
    content = bytearray(text.encode(draw(st.sampled_from(["utf-8"] * 6 + ENCODINGS)), errors="replace"))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        at = draw(st.integers(0, len(content)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip" and at < len(content):
            content[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            content[at:at] = draw(st.sampled_from([b'"', b"\r", b"\x00", b"\xe9", b"\xef\xbb\xbf"]) | st.binary(
                min_size=1, max_size=8))
        elif action == "delete":
            del content[at:at + draw(st.integers(1, 64))]
        elif action == "cut":
            del content[at:]
    return bytes(content)


@fuzz(60)
@given(valid_csv_files())
def test_valid_csv_loads_however_it_was_saved(case):
    content, expected = case
    OUTCOMES["CSV, valid"]["loaded"] += 1  # or the test fails
    with scratch_folder() as folder:
        path = folder / "fer2013.csv"
        path.write_bytes(content)
        for split in SPLITS:
            rows = [(label, seed) for label, usage, seed in expected if usage == split]
            if not rows:
                with pytest.raises(data.DataError, match=f"{re.escape(str(path))} has no '{split}' rows"):
                    data.load_split(path, split, cache_dir=folder / "cache")
                continue
            loaded = data.load_split(path, split, cache_dir=folder / "cache")
            assert [data.CSV_CLASSES.index(loaded.classes[i]) for i in loaded.labels] == [r[0] for r in rows]
            for image, (_, seed) in zip(loaded.images, rows):
                assert np.array_equal(image.flatten().numpy(), pixel_values(seed))


@fuzz(250)
@given(mutated_csv_files())
def test_mutated_csv_loads_or_names_the_file(content):
    with scratch_folder() as folder:
        path = folder / "fer2013.csv"
        path.write_bytes(content)
        loaded = []
        for split in SPLITS:
            try:
                assert_sane(data.load_split(path, split, cache_dir=folder / "cache"))
                loaded.append(split)
            except data.DataError as error:
                assert str(path) in str(error)
    OUTCOMES["CSV, mutated"]["loaded" if loaded else "DataError"] += 1


# Image files.

FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
    "BMP": ["1", "L", "P", "RGB"],
    "WEBP": ["RGB", "RGBA"],
}


def make_image(mode, size, seed):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0])
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if mode in ("I", "F"):
        return Image.fromarray(rng.integers(-1000, 70000, shape).astype(np.int32 if mode == "I" else np.float32))
    return Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).convert(mode)


@st.composite
def image_files(draw):
    """(format, mode, mutation, file bytes): an image in an odd mode (palette with transparency, CMYK,
    16-bit, animated GIF, an EXIF orientation), as saved or truncated, bit-flipped, or random bytes."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    size = (draw(st.integers(1, 96)), draw(st.integers(1, 96)))
    image, options = make_image(mode, size, draw(st.integers(0, 1000))), {}
    if mode == "P" and fmt in ("PNG", "GIF") and draw(st.booleans()):
        options["transparency"] = 0
    if fmt == "GIF" and draw(st.booleans()):
        options.update(save_all=True, append_images=[make_image(mode, size, 1)])
    if fmt in ("JPEG", "PNG", "TIFF", "WEBP") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 10))  # orientation; 1..8 are defined
        options["exif"] = exif
    encoded = io.BytesIO()
    image.save(encoded, fmt, **options)
    content = bytearray(encoded.getvalue())
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "random"]))
    if mutation == "truncate":
        del content[draw(st.integers(0, len(content) - 1)):]
    elif mutation == "flip":
        for _ in range(draw(st.integers(1, 4))):
            content[draw(st.integers(0, len(content) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif mutation == "random":
        content = draw(st.binary(max_size=300))
    return fmt, mode, mutation, bytes(content)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on the corrupt files ("Truncated File Read")
@fuzz(200)
@given(image_files())
def test_image_file_loads_or_is_a_counted_skip(case):
    fmt, mode, mutation, content = case
    with scratch_folder() as folder:
        root = folder / "faces"
        (root / "happy").mkdir(parents=True)
        make_image("L", (48, 48), 0).save(root / "happy" / "good.png")
        fuzzed = root / "sad" / f"fuzzed.{fmt.lower()}"
        fuzzed.parent.mkdir()
        fuzzed.write_bytes(content)

        split, printed = quietly(data.load_split, root, "train", cache_dir=folder / "cache", threads=1)
        assert_sane(split)
        skipped = f"skipped 1 unreadable file(s) in {root}" in printed
        assert len(split.labels) == (1 if skipped else 2)
        assert not (skipped and mutation == "none"), printed
        OUTCOMES["image, folder loading"]["skipped" if skipped else "loaded"] += 1

        try:
            image, gray = predict.open_image(fuzzed)
        except Exception:  # predict.process_chunk counts any Exception as a skipped image
            assert mutation != "none"
            OUTCOMES["image, predict.open_image"]["raised"] += 1
        else:
            assert isinstance(image, Image.Image)
            assert gray.dtype == np.uint8 and gray.shape == (image.height, image.width)
            OUTCOMES["image, predict.open_image"]["opened"] += 1


# Folder names.

SPLIT_FOLDERS = ["train", "TRAIN", "Training", "TrAiNiNg", " train", "train ", "tráin", "train set", "Train"]
# Linux file names are bytes: those that are not UTF-8 (from a Windows zip, say) read as lone surrogates.
FILE_NAME = (st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=40)
             | st.binary(min_size=1, max_size=20).map(os.fsdecode)).filter(
    lambda name: not {"/", "\x00"} & set(name) and name not in (".", "..") and len(os.fsencode(name)) < 200)
CLASS_FOLDERS = st.sampled_from(["Happy", "HAPPY", "happy face", "Sad", " sad ", "Suprise", "Anger", "😀",
                                 "happy\u0301", ".hidden", os.fsdecode(b"caf\xe9")]) | FILE_NAME


@fuzz(80)
@given(FILE_NAME, st.sampled_from(SPLIT_FOLDERS), st.lists(CLASS_FOLDERS, min_size=1, max_size=3, unique=True),
       FILE_NAME)
def test_folder_names_load_or_name_the_folder(data_folder, split_folder, class_folders, image_stem):
    with scratch_folder() as folder:
        root = folder / data_folder
        for seed, name in enumerate(class_folders):
            (root / split_folder / name).mkdir(parents=True)
            make_image("L", (48, 48), seed).save(root / split_folder / name / f"{image_stem}.png", "PNG")
            (root / split_folder / name / f"{image_stem}.txt").write_text("not an image")  # a skip, named
        try:
            split, printed = quietly(data.load_split, root, "train", cache_dir=folder / "cache", threads=1)
        except data.DataError as error:
            assert str(root) in str(error)
            loaded = False
        else:
            assert_sane(split)
            loaded = True
        OUTCOMES["folder names"]["loaded" if loaded else "DataError"] += 1
        visible = [name for name in class_folders if not name.startswith(".")]
        # Kaggle nests a folder in one of the same name (Training/Training/); such a lone class folder is
        # taken for that nesting.
        nested = len(visible) == 1 and visible[0].lower() == split_folder.lower()
        if data.split_name(split_folder) == "train" and visible and not image_stem.startswith(".") and not nested:
            assert loaded and split.classes == data.ordered_classes({data.canonical_class(n) for n in visible})
            assert len(split.labels) == len(visible)
            assert f"skipped {len(visible)} unreadable file(s)" in printed


# ensemble.json.

HEX = "0123456789abcdef"
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8)
ODD_VALUES = st.sampled_from([None, True, False, 0, 1, 2, -1, 0.0, -0.5, float("inf"), float("nan"), 10 ** 400,
                              "", "2", "none", "a" * 64, "g" * 64, HEX * 4 + "0", (HEX * 4).upper(), [], {},
                              [""], ["happy", "happy"], [{}], [1, 2]])


@st.composite
def ensemble_records(draw):
    """A valid ensemble record, as save_ensemble writes it."""
    members = draw(st.lists(st.fixed_dictionaries({
        "path": st.text(max_size=20), "sha256": st.text(HEX, min_size=64, max_size=64),
        "weight": st.floats(0, 1e6) | st.integers(0, 10)}), min_size=1, max_size=3))
    if not any(member["weight"] > 0 for member in members):
        members[0]["weight"] = 1.0
    return {"version": ensemble.VERSION, "tta": draw(st.sampled_from(ensemble.TTA_CHOICES)),
            "classes": draw(st.lists(st.text(max_size=10), min_size=1, max_size=8, unique=True)),
            "members": members, "method": "equal", "val_accuracy": draw(st.floats(0, 1))}


@st.composite
def ensemble_files(draw):
    """File bytes: a valid record, one mutated in one place, random JSON, or bytes that are not JSON."""
    record = draw(ensemble_records())
    where = draw(st.sampled_from(["valid", "top", "member", "members", "whole", "zero weights"]))
    value = draw(ODD_VALUES | JSON_VALUES)
    if where == "top":
        key = draw(st.sampled_from(sorted(record)))
        if draw(st.booleans()):
            del record[key]
        else:
            record[key] = value
    elif where == "member":
        member = draw(st.sampled_from(record["members"]))
        key = draw(st.sampled_from(sorted(member)))
        if draw(st.booleans()):
            del member[key]
        else:
            member[key] = value
    elif where == "members":
        record["members"].append(value)
    elif where == "whole":
        record = value
    elif where == "zero weights":
        for member in record["members"]:
            member["weight"] = 0
    content = json.dumps(record).encode(draw(st.sampled_from(["utf-8", "utf-16"])))
    action = draw(st.sampled_from(["none"] * 6 + ["cut", "random", "latin-1"]))
    if action == "cut":
        content = content[:draw(st.integers(0, len(content)))]
    elif action == "random":
        content = draw(st.binary(max_size=100))
    elif action == "latin-1":
        content = content.replace(b'"', b'"\xe9', 1)
    return content


def valid_record(record):
    """Whether `record` is a valid ensemble file, spelled out independently of load_ensemble."""
    def weight(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf

    if not isinstance(record, dict) or record.get("version") != ensemble.VERSION:
        return False
    classes, members = record.get("classes"), record.get("members")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return False
    if len(set(classes)) != len(classes) or record.get("tta") not in ensemble.TTA_CHOICES:
        return False
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        return False
    for member in members:
        sha256 = member.get("sha256")
        if not isinstance(member.get("path"), str) or not weight(member.get("weight")):
            return False
        if not isinstance(sha256, str) or len(sha256) != 64 or not set(sha256) <= set(HEX):
            return False
    return any(member["weight"] > 0 for member in members)


def parsed_json(content):
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return None


@fuzz(300)
@given(ensemble_files())
def test_ensemble_file_is_a_record_or_a_usage_error(content):
    with scratch_folder() as folder:
        path = folder / "ensemble.json"
        path.write_bytes(content)
        record = parsed_json(content)
        try:
            loaded = ensemble.load_ensemble(path)
        except UsageError as error:
            assert str(path) in str(error)
            assert not valid_record(record)
            OUTCOMES["ensemble.json"]["UsageError"] += 1
        else:
            assert valid_record(record) and json.dumps(loaded) == json.dumps(record)
            OUTCOMES["ensemble.json"]["record"] += 1


# Regression tests: each failure the fuzzing found (or the same inputs, probed by hand), pinned.

def fer_csv(path, rows, header="emotion,pixels,Usage", encoding="utf-8"):
    """A FER-2013 CSV of `rows`, given as strings with {p} for a valid pixel field, or as bytes."""
    lines = [line if isinstance(line, bytes) else line.format(p=" ".join(["7"] * 2304)).encode(encoding)
             for line in [header, *rows]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_csv_with_a_latin1_byte_in_usage_names_the_file_the_row_and_the_encoding(tmp_path):
    # Was a UnicodeDecodeError traceback (issue #21): a spreadsheet saved the file as Latin-1.
    pixels = " ".join(["7"] * 2304).encode()
    path = fer_csv(tmp_path / "fer2013.csv", ["3,{p},Training", b"4," + pixels + b",Training\xe9"])
    message = r"row 3: Usage b'Training\\xe9' is not UTF-8 text \(Latin-1 or Windows-1252\?\); save the file as"
    with pytest.raises(data.DataError, match=f"^{re.escape(str(path))}, {message} 'CSV UTF-8'$"):
        data.load_split(path, "train", cache_dir=tmp_path / "cache")


def test_csv_with_latin1_text_in_an_extra_column_loads(tmp_path):
    # Was a UnicodeDecodeError: the bad byte is in a column that is not used, so it does no harm.
    path = fer_csv(tmp_path / "fer2013.csv", ["3,{p},Training,caf\xe9", "5,{p},PublicTest,na\xefve"],
                   header="emotion,pixels,Usage,note", encoding="latin-1")
    assert data.load_split(path, "train", cache_dir=tmp_path / "cache").classes == ["happy", "surprise"]
    assert len(data.load_split(path, "val", cache_dir=tmp_path / "cache").labels) == 1


@pytest.mark.parametrize("content", [
    b"\x80emotion,pixels,Usage\n",  # was a UnicodeDecodeError: random bytes, the fuzzer's first find
    "emotion,pixels,Usage\n".encode("utf-16"),  # a spreadsheet's "Unicode text" export
    "emotion,pixels,Usage\n".encode("utf-16-le"),
])
def test_csv_that_is_not_utf8_at_all_says_so(tmp_path, content):
    path = tmp_path / "fer2013.csv"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=f"^{re.escape(str(path))}: missing column.*header row is not UTF-8"):
        data.load_split(path, "train", cache_dir=tmp_path / "cache")


def test_csv_pixel_value_beyond_int32_names_the_row(tmp_path):
    # Was an OverflowError: numpy refuses 99999999999 as an int32 with OverflowError, not ValueError.
    path = fer_csv(tmp_path / "fer2013.csv", ["3,99999999999" + " 7" * 2303 + ",Training"])
    with pytest.raises(data.DataError, match=f"^{re.escape(str(path))}, row 2: pixels must be whole numbers in 0..255"):
        data.load_split(path, "train", cache_dir=tmp_path / "cache")


def test_csv_quote_left_open_names_the_line(tmp_path):
    # Was a csv.Error: the open quote swallows the rest of the file into one field, past csv's size limit.
    path = fer_csv(tmp_path / "fer2013.csv", ['3,{p},"Training'] + ["3,{p},Training"] * 40)
    with pytest.raises(data.DataError, match=f"^{re.escape(str(path))}, line [0-9]+: field larger than.*quote"):
        data.load_split(path, "train", cache_dir=tmp_path / "cache")
    # Within csv's limit, the row is named, and the swallowed rows are not all printed.
    path = fer_csv(tmp_path / "fer2013.csv", ['3,{p},"Training'] + ["3,{p},Training"] * 3)
    with pytest.raises(data.DataError, match=f"^{re.escape(str(path))}, row 2: Usage 'Training.{{0,30}}' is not"):
        data.load_split(path, "train", cache_dir=tmp_path / "cache")


def test_folder_whose_name_is_not_utf8_loads(tmp_path):
    # Was a UnicodeEncodeError: the cache file's name hashed the folder's path as UTF-8 text.
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/fotos-\xe9"))
    (root / "happy").mkdir(parents=True)
    make_image("L", (48, 48), 0).save(root / "happy" / "a.png")
    assert len(data.load_split(root, "train", cache_dir=tmp_path / "cache", threads=1).labels) == 1


def test_unreadable_file_whose_name_is_not_utf8_is_a_named_skip(tmp_path):
    # Was a UnicodeEncodeError from print(): a UTF-8 terminal refuses the file name's lone surrogate.
    (tmp_path / "d" / "happy").mkdir(parents=True)
    make_image("L", (48, 48), 0).save(tmp_path / "d" / "happy" / "a.png")
    Path(os.fsdecode(os.fsencode(tmp_path) + b"/d/happy/b\xff.png")).write_bytes(b"not an image")
    split, printed = quietly(data.load_split, tmp_path / "d", "train", cache_dir=tmp_path / "cache", threads=1)
    assert len(split.labels) == 1
    assert "b\\udcff.png" in printed and "skipped 1 unreadable file(s)" in printed


def valid_ensemble(**changes):
    record = {"version": ensemble.VERSION, "classes": ["happy", "sad"], "tta": "flip",
              "members": [{"path": "a/best.pt", "sha256": "0" * 64, "weight": 0.25},
                          {"path": "b/best.pt", "sha256": "f" * 64, "weight": 0}]}
    return {**record, **changes}


def member_change(**changes):
    return {"members": [{**valid_ensemble()["members"][0], **changes}]}


@pytest.mark.parametrize("content, problem", [
    # Each was a ValueError (callers catch UsageError), or worse:
    (b"", "cannot read"), (b"{", "cannot read"), (b'{"\xe9": 1}', "cannot read"),  # not JSON or not UTF-8
    (b"[" * 100000, "cannot read"),  # a RecursionError, not a ValueError
    (b"[]", "expected a JSON object"), (b"null", "expected a JSON object"),  # AttributeError: no .get
    (json.dumps(valid_ensemble(version=1)), "version 1, expected"),
    (json.dumps(valid_ensemble(classes=None)), '"classes"'),  # loaded, to fail later in a caller
    (json.dumps(valid_ensemble(classes=["happy", "happy"])), '"classes"'),
    (json.dumps(valid_ensemble(members=None)), '"members"'),
    (json.dumps(valid_ensemble(members=[1])), '"members"'),  # loaded, to fail later in a caller
    (json.dumps(valid_ensemble(tta="mirror")), '"tta"'),
    (json.dumps(valid_ensemble(**member_change(weight=float("nan")))), '"weight"'),
    (json.dumps(valid_ensemble(**member_change(weight=-1))), '"weight"'),
    (json.dumps(valid_ensemble(**member_change(weight=True))), '"weight"'),
    (json.dumps(valid_ensemble(**member_change(weight="0.5"))), '"weight"'),
    (json.dumps(valid_ensemble(**member_change(weight=0))), "every member has weight 0"),
    (json.dumps(valid_ensemble(**member_change(sha256="0" * 63))), '"sha256"'),
    (json.dumps(valid_ensemble(**member_change(path=None))), '"path"'),
])
def test_ensemble_file_that_is_not_a_valid_record_is_a_usage_error(tmp_path, content, problem):
    path = tmp_path / "ensemble.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UsageError, match=re.escape(str(path))) as raised:
        ensemble.load_ensemble(path)
    assert problem in str(raised.value)


def test_ensemble_file_missing_or_a_folder_is_a_usage_error(tmp_path):
    for path in (tmp_path / "missing.json", tmp_path):
        with pytest.raises(UsageError, match=f"cannot read ensemble {re.escape(str(path))}"):
            ensemble.load_ensemble(path)


def test_ensemble_file_as_saved_loads(tmp_path):
    member = tmp_path / "run" / "best.pt"
    member.parent.mkdir()
    member.write_bytes(b"weights")
    fit = {"weights": [1.0], "method": "equal", "val_accuracy": 0.5, "val_nll": 1.0, "candidates": {}}
    saved = ensemble.save_ensemble(tmp_path / "ensemble.json", [member], ["happy", "sad"], fit, "tencrop")
    assert ensemble.load_ensemble(tmp_path / "ensemble.json") == saved
    with_bom = tmp_path / "edited.json"  # an editor that writes a BOM
    with_bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "ensemble.json").read_bytes())
    assert ensemble.load_ensemble(with_bom) == saved


def test_zz_print_examples_per_reader(capsys):
    """Last in this file: how many examples each reader was fuzzed with, for the CI log."""
    with capsys.disabled():
        print("\nfuzz examples per reader:")
        for reader, outcomes in sorted(OUTCOMES.items()):
            counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
            print(f"  {reader}: {sum(outcomes.values())} ({counts})")
