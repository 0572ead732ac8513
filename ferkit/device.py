"""Which device and numeric precision a script runs on, and the autocast context for it."""
import contextlib
import os

import torch

CPU_BF16_OVERRIDE = "FER_CPU_BF16"


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_runs_bf16_natively():
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 or AMX). Without them bf16 autocast falls
    back to slow generic code, many times slower than fp32 (docs/results.md, "Precision on CPUs without
    bf16"). The check is PyTorch's own private one; where a release drops it, fp32 is the safe answer.
    FER_CPU_BF16=1 or 0 in the environment overrides the check, so that the test suite can be run with
    `--precision auto` resolving either way on any CPU."""
    forced = os.environ.get(CPU_BF16_OVERRIDE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{CPU_BF16_OVERRIDE}={forced!r}: set it to 1 (bf16) or 0 (fp32), or unset it")
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def resolve_precision(precision, device):
    """`auto` is bf16 on CPUs with native bf16 kernels (where it trains faster than fp32:
    benchmarks/speed.py --precision measures by how much) and on CUDA GPUs that support it, fp16 on older
    CUDA GPUs, and fp32 elsewhere, other CPUs included."""
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_runs_bf16_natively() else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
