"""What every script's command line shares: the error a library raises for a bad request, the value
checks argparse runs, the device flags, and the one-line error report at the top of each script."""
import argparse
import shutil
import sys

from data import DataError
from ferkit.files import write_text_atomic
from ferkit.device import default_threads

PRECISIONS = ["auto", "bf16", "fp16", "fp32"]


class UsageError(Exception):
    """A request that cannot be carried out (a missing file, flags that do not fit together), explained
    in terms the user can act on. Library code raises it; only a script's entry point exits."""


def positive(kind):
    """An argparse type: `kind(text)`, refused unless greater than zero."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def probability(text):
    """An argparse type: a float between 0 and 1."""
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value



def add_device_flags(parser, batch_size, batch_help):
    """--device, --precision, --threads and --batch-size, declared once for every script."""
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 autocast on CPUs with native bf16 (AVX-512, AMX) and on recent GPUs, fp16 on older "
                             "GPUs, fp32 elsewhere (on other CPUs bf16 is many times slower than fp32)")
    parser.add_argument("--threads", type=positive(int), default=default_threads(),
                        help="CPU threads; on a busy machine 1 is often faster for a few images")
    parser.add_argument("--batch-size", type=positive(int), default=batch_size, help=batch_help)


def add_model_flags(parser):
    """--checkpoints, --ensemble or --runs: the models a script runs; with none of them, the shipped ensemble."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoints", nargs="+", default=None,
                        help="checkpoint (.pt) or shipped (.safetensors) files, averaged with equal weights (name "
                             "the inputs first); unset: see --runs")
    source.add_argument("--ensemble", default=None, help="ensemble.json written by evaluate.py or export.py; unset: "
                                                         "see --runs")
    source.add_argument("--runs", default=None, metavar="DIR",
                        help="a training folder (train.py --out): its evaluation/ensemble.json if evaluate.py fitted "
                             "one, else every DIR/**/best.pt with equal weights; unset, with no --checkpoints or "
                             "--ensemble: the shipped weights/ensemble.json")


def run(main):
    """Call a script's main(); a UsageError or DataError becomes one line on stderr and exit status 1."""
    try:
        main()
    except (UsageError, DataError) as error:
        sys.exit(f"error: {error}")


def check_writable(folder, needed_bytes):
    """Fail now, not after an hour of training, if `folder` cannot be written or lacks the room."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / ".write-test", "ok")
        (folder / ".write-test").unlink()
    except OSError as error:
        raise UsageError(f"cannot write to {folder}: {error.strerror or error}. Choose another --out.") from error
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UsageError(f"{folder} has {free / 1e6:.0f} MB free; a run needs about {needed_bytes / 1e6:.0f} MB.")
