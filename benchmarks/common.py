"""What every benchmark script shares: a description of the machine, call timing, and writing results."""
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks import the repository's modules

from ferkit.files import write_text_atomic  # noqa: E402  (after the repository is on the path)
from ferkit.device import autocast, default_threads, resolve_precision  # noqa: E402

MATMUL_SIZE = 4096  # large enough that the matmul runs at the machine's compute peak, not memory speed
CPU_PRECISION = resolve_precision("auto", torch.device("cpu"))  # what train.py trains in on this CPU


def matmul_peak(device=torch.device("cpu"), precision="auto", repeats=5, size=MATMUL_SIZE):
    """Multiply-adds per second of a large matmul under autocast (`auto`: the precision train.py would
    use on `device`): the machine's reachable peak, printed beside every time because machines of the
    same name differ in speed from day to day. The fastest of `repeats`, since contention from other
    work only ever slows it down."""
    precision = resolve_precision(precision, device)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def multiply():
        with autocast(device, precision):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return size ** 3 / min(timings(multiply, repeats))


def machine():
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            name = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), name)
    except OSError:
        pass
    return {"processor": name, "cpu_count": os.cpu_count(), "usable_cpus": default_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "matmul_precision": CPU_PRECISION,
            "matmul_peak_gmacs": round(matmul_peak() / 1e9)}


def peak_text(machine_record):
    """'bf16 matmul peak 330 G multiply-adds/s' for a machine() record."""
    return (f"{machine_record['matmul_precision']} matmul peak {machine_record['matmul_peak_gmacs']} "
            "G multiply-adds/s")


def timings(function, repeats, warm=1):
    """Seconds taken by each of `repeats` calls, after `warm` untimed ones (first calls pay for
    allocator growth and kernel selection)."""
    for _ in range(warm):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def publish(result, table, out):
    """Print the markdown table and write the figures as JSON to `out`."""
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result
