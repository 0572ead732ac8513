"""Speed benchmark: train.py's training step (in-memory uint8 images, batch augmentation on the device,
bf16 autocast on CPU, channels-last) against the usual FER pipeline (torchvision ImageFolder decoding
JPEGs with PIL, per-image transforms in 2 DataLoader workers, fp32), plus evaluation throughput,
single-image latency, cached data loading, peak memory and the step's share of peak matmul speed.

    python benchmarks/speed.py            # ../shared/data/fer2013 if present, else synthetic JPEGs
    python benchmarks/speed.py --quick    # about a minute: smoke run

The pipelines take turns window by window, so drift on a shared machine hits all alike. Prints a
markdown table; writes the figures to --out as JSON.
"""
import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import datasets, transforms as T

from common import MATMUL_SIZE, ROOT, machine, matmul_peak, publish, timings

from ferkit import cli  # noqa: E402  (common put the repository on the path)
import data  # noqa: E402
import evaluate  # noqa: E402
from ferkit import inference  # noqa: E402
from ferkit import synthetic  # noqa: E402
import train  # noqa: E402
from ferkit.device import pick_device, resolve_precision  # noqa: E402
from models import MODELS, build_model, describe_model  # noqa: E402

TRAIN = train.build_parser().parse_args([])  # train.py's defaults: batch size, SGD, augmentation, threads
EVAL_BATCH = evaluate.build_parser().get_default("batch_size")
SHARED_DATA = ROOT.parent / "shared" / "data" / "fer2013"
VAL_SIZE = 3589  # FER-2013 PublicTest; the synthetic val split is rendered at this size
SYNTHETIC_TRAIN_PER_CLASS = 600
WORKERS, PREFETCH = 2, 2  # the num_workers most FER repositories use; DataLoader's default prefetch_factor
# Untimed steps at the start of every window: enough to use up the batches the plain loader's workers
# prefetched while the other pipeline ran, so no window starts with free batches.
WARM_STEPS = WORKERS * PREFETCH


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    p.add_argument("--windows", type=cli.positive(int), default=7,
                   help="timed windows per pipeline and model; the median is reported")
    p.add_argument("--window-batches", type=cli.positive(int), default=10, help="timed training batches per window")
    p.add_argument("--data", default=None,
                   help=f"image folder with train/ (and val/) class folders, or 'synthetic'; unset: {SHARED_DATA} "
                        "if it exists, else synthetic JPEGs written to a temporary folder")
    p.add_argument("--out", default="runs/benchmarks/speed.json", help="JSON file for the figures")
    p.add_argument("--threads", type=cli.positive(int), default=TRAIN.threads, help="CPU threads")
    p.add_argument("--precision", default=TRAIN.precision, choices=cli.PRECISIONS,
                   help="our pipeline's autocast precision, as train.py's --precision (the fp32 row is always "
                        "measured too); bf16 on a CPU without native bf16 shows why auto avoids it there")
    p.add_argument("--matmul-size", type=cli.positive(int), default=MATMUL_SIZE,
                   help="side of the square matmul that measures the peak; smaller where it is slow (emulated bf16)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run of about a minute: 2 windows of 2 batches, fewer repeats "
                        "(overrides --windows and --window-batches)")
    return p


def write_synthetic_folder(root):
    """Synthetic faces as JPEG class folders, so both pipelines read the same files on a fresh clone."""
    for split, per_class in (("train", SYNTHETIC_TRAIN_PER_CLASS), ("val", -(-VAL_SIZE // len(synthetic.CLASSES)))):
        images, labels, classes = synthetic.render_split(split, per_class)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def load_splits(choice, temporary):
    """Train and val splits via data.load_split, timing the first and the second (cached) train load,
    and the folder of training JPEGs for the plain pipeline."""
    source, cache_dir = choice, None
    if choice == "synthetic":  # its decode cache goes in the temporary folder too, not in .cache/
        source, cache_dir = write_synthetic_folder(temporary / "data"), temporary / "cache"
    first, cached = timings(lambda: data.load_split(source, "train", cache_dir), 2, warm=0)  # decode or cache, cache
    train_split = data.load_split(source, "train", cache_dir)
    has_val = "val" in data.available_splits(source)
    val = data.load_split(source, "val", cache_dir) if has_val else data.carve_validation(train_split)[1]
    folders = data.split_folders(source)
    return train_split, val, folders.get("train", folders.get("all")), {"first_s": first, "cached_s": cached}


def trainer(name, classes, device, precision, memory_format):
    """Model, optimizer and scaler set up as train.set_up does."""
    torch.manual_seed(TRAIN.seed)
    model = build_model(name, classes).to(device, memory_format=memory_format).train()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return model, train.build_optimizer(model, TRAIN), scaler


def step_on(trained, x, y, device, precision, memory_format):
    """train.py's training step on one batch, in the given memory format."""
    model, optimizer, scaler = trained
    return train.train_step(model, optimizer, scaler, x.contiguous(memory_format=memory_format), y, device,
                            precision, TRAIN.label_smoothing)


def ours(name, split, device, precision, memory_format=torch.channels_last):
    """A function running one of train.py's training steps on the next batch of the in-memory split."""
    trained = trainer(name, len(split.classes), device, precision, memory_format)
    images, labels = split.images.to(device), split.labels.to(device)
    generator = torch.Generator(device).manual_seed(TRAIN.seed)
    augmentation = data.augmentation_settings(TRAIN)
    per_epoch = len(labels) // TRAIN.batch_size  # full batches only, so every timed batch is the same size
    state = {"batch": 0, "order": None}

    def step():
        epoch, batch = divmod(state["batch"], per_epoch)
        if batch == 0:
            state["order"] = train.epoch_order(len(labels), TRAIN.seed, epoch, device)
        index = state["order"][batch * TRAIN.batch_size:(batch + 1) * TRAIN.batch_size]
        state["batch"] += 1
        x = data.augment_batch(images[index].float().div_(255), generator, **augmentation)
        return step_on(trained, x, labels[index], device, precision, memory_format)
    return step


def plain(name, folder, classes, device):
    """A function running one fp32, contiguous-memory training step on the next batch of the usual
    pipeline: ImageFolder (PIL decoding to RGB), per-image torchvision transforms, DataLoader workers."""
    trained = trainer(name, classes, device, "fp32", torch.contiguous_format)
    transform = T.Compose([
        T.Grayscale(1), T.Resize(48), T.RandomHorizontalFlip(), T.RandomRotation(10),
        T.RandomResizedCrop(48, scale=(0.8, 1)), T.ColorJitter(0.2, 0.2), T.ToTensor(), T.RandomErasing(0.25)])
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(folder, transform=transform), batch_size=TRAIN.batch_size, shuffle=True,
        num_workers=WORKERS, prefetch_factor=PREFETCH, drop_last=True,
        generator=torch.Generator().manual_seed(TRAIN.seed))
    state = {"iterator": iter(loader)}

    def step():
        try:
            x, y = next(state["iterator"])
        except StopIteration:  # a new epoch starts new workers, as it does in those repositories
            state["iterator"] = iter(loader)
            x, y = next(state["iterator"])
        return step_on(trained, x.to(device), y.to(device), device, "fp32", torch.contiguous_format)

    return step, lambda: state.pop("iterator")  # dropping the iterator stops its workers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window(step, batches, device):
    """Training images per second over `batches` steps, after WARM_STEPS untimed ones."""
    for _ in range(WARM_STEPS):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
    return batches * TRAIN.batch_size / (time.perf_counter() - started)


def compare_training(name, split, folder, device, precision, windows, batches):
    """Images/s of each timed window, the pipelines taking turns, the first one rotating every round.
    ours_fp32 is our data path in fp32 and contiguous memory: it tells what precision and memory
    format alone are worth."""
    pipelines = {"ours": ours(name, split, device, precision),
                 "ours_fp32": ours(name, split, device, "fp32", torch.contiguous_format)}
    pipelines["plain"], close = plain(name, folder, len(split.classes), device)
    names = list(pipelines)
    rates = {pipeline: [] for pipeline in names}
    for round_number in range(windows):
        turn = round_number % len(names)
        for pipeline in names[turn:] + names[:turn]:
            rates[pipeline].append(window(pipelines[pipeline], batches, device))
        print(f"  {name} round {round_number + 1}/{windows}: "
              + ", ".join(f"{p} {rates[p][-1]:.0f}" for p in names) + " images/s", flush=True)
    close()
    return rates


def inference_speed(name, val, device, precision, eval_repeats, latency_repeats):
    """inference.predict_probs (tta none) on the whole val split, and on one image, as evaluate.py runs it."""
    model = build_model(name, len(val.classes)).to(device).eval()  # as checkpoint.model_from_checkpoint builds it
    seconds = statistics.median(timings(
        lambda: inference.predict_probs(model, val.images, "none", EVAL_BATCH, precision), eval_repeats))
    latency = statistics.median(timings(
        lambda: inference.predict_probs(model, val.images[:1], "none", 1, precision), latency_repeats, warm=3))
    return {"eval_images_per_s": len(val.labels) / seconds, "eval_val_s": seconds, "latency_ms": 1000 * latency}


def measure_model(name, train_split, val, train_folder, device, precision, args, repeats):
    rates = compare_training(name, train_split, train_folder, device, precision, args.windows, args.window_batches)
    ours_rate, plain_rate = statistics.median(rates["ours"]), statistics.median(rates["plain"])
    fp32_rate = statistics.median(rates["ours_fp32"])
    macs = describe_model(build_model(name, len(train_split.classes)))["macs"]
    # Backward costs about twice the forward (gradients of inputs and of weights), hence 3x; slightly
    # generous, as the first convolution's input needs no gradient.
    return {"ours_images_per_s": ours_rate, "plain_images_per_s": plain_rate, "ratio": ours_rate / plain_rate,
            "ours_fp32_images_per_s": fp32_rate, "precision_gain": ours_rate / fp32_rate,
            "step_gmacs": 3 * macs * ours_rate / 1e9, "macs_per_image": macs,
            **{f"windows_{pipeline}": r for pipeline, r in rates.items()},
            **inference_speed(name, val, device, precision, *repeats)}


def peak_rss_mb():
    """The main process's peak resident memory so far. DataLoader workers are left out: forked, they
    share the parent's pages, and Linux reports a forked child's peak as at least its parent's."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e6


def markdown(result):
    m, s, figures = result["machine"], result["settings"], result["models"]
    names = list(figures)
    row = lambda label, key, fmt: f"| {label} | " + " | ".join(format(figures[n][key], fmt) for n in names) + " |"
    load, memory = result["load"], result["peak_rss_mb_after"]
    return "\n".join([
        f"**Speed**: {m['processor']}, {s['threads']} thread(s) of {m['usable_cpus']} usable CPUs, torch {m['torch']}, "
        f"device {s['device']}; data {s['data']} ({s['train_images']} train, {s['val_images']} val images); "
        f"batch {s['batch_size']}; median of {s['windows']} windows of {s['window_batches']} batches", "",
        "| measurement | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names),
        row(f"training images/s, ours ({s['precision']}, channels-last, batch augmentation)", "ours_images_per_s", ".0f"),
        row(f"training images/s, plain (ImageFolder + PIL transforms, {WORKERS} workers, fp32)", "plain_images_per_s", ".0f"),
        row("training images/s, ours in fp32 and contiguous memory", "ours_fp32_images_per_s", ".0f"),
        row("speed-up, ours / plain", "ratio", ".2f"),
        row(f"speed-up from {s['precision']} and channels-last alone, ours / ours in fp32", "precision_gain", ".2f"),
        row("our step's multiply-adds, G/s (forward + backward = 3x forward)", "step_gmacs", ".1f"),
        row(f"  as a fraction of the {s['precision']} {s['matmul_size']}x{s['matmul_size']} matmul peak",
            "fraction_of_peak", ".2f"),
        row("evaluation images/s (predict_probs, tta none)", "eval_images_per_s", ".0f"),
        row(f"evaluating the {s['val_images']}-image val split, s", "eval_val_s", ".2f"),
        row(f"single-image latency, ms (median of {s['latency_repeats']})", "latency_ms", ".2f"), "",
        f"Matmul peak: {result['matmul_peak_gmacs']:.3g} G multiply-adds/s ({s['precision']}). Training split "
        f"load via data.load_split: {load['cached_s']:.2f} s cached (first call {load['first_s']:.2f} s). "
        f"Peak resident memory of the main process: {max(memory.values()):.0f} MB ({memory['imports']:.0f} MB "
        "of it from importing the libraries)."])


def main(argv=None):
    args = build_parser().parse_args(argv)
    memory = {"imports": peak_rss_mb()}  # after each phase: the peak only grows, so this shows which raised it
    if args.quick:
        args.windows, args.window_batches = 2, 2
    eval_repeats, latency_repeats, matmul_repeats = (1, 10, 3) if args.quick else (3, 50, 10)
    torch.set_num_threads(args.threads)
    device = pick_device(TRAIN.device)
    precision = resolve_precision(args.precision, device)
    choice = args.data or (str(SHARED_DATA) if (SHARED_DATA / "train").is_dir() else "synthetic")
    if choice != "synthetic" and not Path(choice).is_dir():  # ImageFolder needs image files, not a CSV
        sys.exit(f"error: --data {choice}: expected a folder of class folders of images, or 'synthetic'")
    with tempfile.TemporaryDirectory(prefix="fer-speed-") as temporary:
        try:
            train_split, val, train_folder, load = load_splits(choice, Path(temporary))
        except data.DataError as error:
            sys.exit(f"error: {error}")
        memory["load"] = peak_rss_mb()
        print(f"data {choice}: {len(train_split.labels)} train, {len(val.labels)} val images; {device}, {precision}")
        peak = matmul_peak(device, precision, matmul_repeats, args.matmul_size)
        memory["matmul"] = peak_rss_mb()
        figures = {}
        for name in args.models:
            figures[name] = measure_model(name, train_split, val, train_folder, device, precision, args,
                                          (eval_repeats, latency_repeats))
            memory[name] = peak_rss_mb()
        peak = max(peak, matmul_peak(device, precision, matmul_repeats, args.matmul_size))  # before and after: less at the mercy of load
        for figure in figures.values():
            figure["fraction_of_peak"] = figure["step_gmacs"] * 1e9 / peak
    result = {"machine": machine(), "settings": {
        "threads": args.threads, "device": str(device), "precision": precision, "data": choice,
        "train_images": len(train_split.labels), "val_images": len(val.labels), "batch_size": TRAIN.batch_size,
        "windows": args.windows, "window_batches": args.window_batches, "warm_steps_per_window": WARM_STEPS,
        "latency_repeats": latency_repeats, "matmul_size": args.matmul_size, "quick": args.quick},
        "matmul_peak_gmacs": peak / 1e9, "load": load, "peak_rss_mb_after": memory, "models": figures}
    return publish(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
