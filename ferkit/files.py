"""Writing files so that a run killed at any instant leaves either the old or the new file whole."""
import os
from pathlib import Path


def write_atomic(path, write):
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it over
    `path`: the rename is atomic, so readers never see a half-written file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path, text):
    write_atomic(path, lambda file: file.write(text.encode()))


def safe_filename(name, limit=80):
    """A file name built from untrusted text: letters, digits, '-', '_' and '.', never a path."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return cleaned[:limit] or "unnamed"
