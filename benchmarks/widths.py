"""Which convolution widths this CPU trains fast, at each of the feature-map sizes a 48x48 network passes
through: the first measurement issue #39 asks for before a network is shaped for CPU throughput.

    python benchmarks/widths.py                                  # 48, 24, 12, 6 px; widths 16-256
    python benchmarks/widths.py --sizes 12 6 --widths 64 96 128 --depth 4

Each cell times a training step (forward, backward, SGD) of `--depth` 3x3 conv-BN-ReLU layers at one width
and one feature-map size, in the precision and memory format train.py trains in on this machine, and prints
the multiply-adds per second it reaches as a fraction of the machine's matmul peak (printed in the header):
a width whose fraction is high is one oneDNN runs well here. The batch holds about the same work in every
cell, so that the small maps are timed on batches as large as a network would give them.
"""
import argparse
import statistics

import torch
from torch import nn

from common import CPU_PRECISION, machine, peak_text, publish, timings

from ferkit import cli  # noqa: E402  (common: the path)
from ferkit.device import autocast  # noqa: E402
from models import conv_bn_relu  # noqa: E402

TRAINING_PASSES = 3  # forward + backward, which costs about two forwards (benchmarks/accuracy.py)
STEP_MACS = 2e9  # forward multiply-adds per timed step: the batch is sized to it, within BATCH_RANGE
BATCH_RANGE = (8, 1024)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=cli.positive(int), default=[48, 24, 12, 6], help="feature-map sides")
    p.add_argument("--widths", nargs="+", type=cli.positive(int), default=[16, 32, 48, 64, 96, 128, 192, 256],
                   help="channels of every layer in a cell")
    p.add_argument("--depth", type=cli.positive(int), default=2, help="conv-BN-ReLU layers per cell")
    p.add_argument("--steps", type=cli.positive(int), default=5, help="timed steps per cell; the median counts")
    p.add_argument("--threads", type=cli.positive(int), default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--out", default="runs/benchmarks/widths.json", help="JSON file for the figures")
    return p


def stack(width, depth):
    layers = []
    for _ in range(depth):
        layers += conv_bn_relu(width, width)
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def cell_macs(width, size, depth):
    """Forward multiply-adds of one image through a cell."""
    return depth * size * size * width * width * 9


def time_cell(width, size, depth, steps):
    """(images per second, batch) of training steps through one cell, in train.py's CPU precision."""
    macs = cell_macs(width, size, depth)
    batch = int(min(max(STEP_MACS // macs, BATCH_RANGE[0]), BATCH_RANGE[1]))
    model = stack(width, depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, width, size, size).contiguous(memory_format=torch.channels_last)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), CPU_PRECISION):
            loss = model(images).float().square().mean()
        loss.backward()
        optimizer.step()
    return batch / statistics.median(timings(step, steps, warm=2)), batch


def measure(args):
    cells = {}
    for size in args.sizes:
        for width in args.widths:
            images_per_s, batch = time_cell(width, size, args.depth, args.steps)
            gmacs = images_per_s * TRAINING_PASSES * cell_macs(width, size, args.depth) / 1e9
            cells[f"{size}x{width}"] = {"batch": batch, "images_per_s": round(images_per_s, 1),
                                        "gmacs": round(gmacs, 1)}
    return cells


def markdown(result):
    m, peak = result["machine"], result["machine"]["matmul_peak_gmacs"]
    header = " | ".join(f"width {w}" for w in result["widths"])
    lines = [f"**Training throughput by width**: {result['depth']} 3x3 conv-BN-ReLU layers a cell, {result['precision']}, "
             f"channels-last, {result['threads']} thread(s); {m['processor']} ({peak_text(m)}). Each cell: G "
             "multiply-adds/s of training (3x forward) and, in brackets, its fraction of the matmul peak", "",
             f"| map side | {header} |", "| ---: |" + " ---: |" * len(result["widths"])]
    for size in result["sizes"]:
        cells = [result["cells"][f"{size}x{w}"]["gmacs"] for w in result["widths"]]
        lines.append(f"| {size} | " + " | ".join(f"{g:.0f} ({g / peak:.2f})" for g in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine(), "precision": CPU_PRECISION, "threads": args.threads, "depth": args.depth,
              "sizes": args.sizes, "widths": args.widths, "cells": measure(args)}
    return publish(result, markdown(result), args.out)


if __name__ == "__main__":
    cli.run(main)
