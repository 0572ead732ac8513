"""Train facial-expression CNNs (model_x, model_y) with batch augmentation, SGD and a learning-rate
schedule (cosine decay by default, or reduced on plateau). One run folder per model under --out holds
metrics.csv, curves.png, config.json, last.pt (every epoch) and best.pt (best validation accuracy).

    python train.py --data ../shared/data/fer2013
    python train.py --resume            # continue an interrupted run where it stopped
"""
import argparse
import csv
import io
import json
import math
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import augment
import data
from files import write_atomic, write_text_atomic
from models import MODELS, autocast, build_model, default_threads, describe_model, pick_device, resolve_precision
from resume import (open_run, restore_rng, resume_optimizer, resume_scheduler, resumed_config, rng_state,
                    saved_data_source)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_sec"]
AUGMENT_FLAGS = list(augment.DEFAULTS)
# An epoch of model_y costs about three quarters of one of model_x, so model_y gets more of them within
# the same budget (both models in 90 minutes on 2 CPU cores); 72 instead of 60 lifts the ensemble's
# FER-2013 validation accuracy by 0.1-1.1 points (README, "Ablations").
DEFAULT_EPOCHS = {"model_x": 60, "model_y": 72}


def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    return parse


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="FER folder, FER-2013 CSV, or 'synthetic'; unset: ./data if it exists, else synthetic")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to train")
    p.add_argument("--out", default="runs", help="folder for the run folders, one per model")
    p.add_argument("--resume", action="store_true",
                   help="continue each model's run from its last.pt; flags you pass override its saved ones")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run instead of refusing")
    p.add_argument("--epochs", type=positive(int), default=None,
                   help="maximum epochs, for every model trained; None: each model's own, "
                        + ", ".join(f"{name} {epochs}" for name, epochs in DEFAULT_EPOCHS.items()))
    p.add_argument("--batch-size", type=positive(int), default=128, help="training (and validation) batch size")
    p.add_argument("--lr", type=positive(float), default=0.03, help="initial SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--label-smoothing", type=probability, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--schedule", default="cosine", choices=["plateau", "cosine"],
                   help="how the learning rate falls: cosine (a cosine decay from the initial rate to the floor "
                        "over all epochs) or plateau (cut when validation loss stalls, the seed's schedule)")
    p.add_argument("--plateau-patience", type=int, default=3,
                   help="epochs without validation-loss improvement before the learning rate is cut")
    p.add_argument("--plateau-factor", type=probability, default=0.3, help="learning-rate cut factor")
    p.add_argument("--min-lr", type=float, default=3e-4,
                   help="learning-rate floor; training stops once there and validation stops improving")
    p.add_argument("--hflip", type=probability, default=augment.DEFAULTS["hflip"], help="horizontal flip probability")
    p.add_argument("--vflip", type=probability, default=augment.DEFAULTS["vflip"],
                   help="vertical flip probability (faces are never upside down)")
    p.add_argument("--rotation", type=float, default=augment.DEFAULTS["rotation"], help="maximum rotation, degrees")
    p.add_argument("--crop-scale", type=probability, default=augment.DEFAULTS["crop_scale"],
                   help="smallest area fraction of the random resized crop (1 = off)")
    p.add_argument("--brightness", type=probability, default=augment.DEFAULTS["brightness"],
                   help="maximum relative brightness change")
    p.add_argument("--contrast", type=probability, default=augment.DEFAULTS["contrast"],
                   help="maximum relative contrast change")
    p.add_argument("--erasing", type=probability, default=augment.DEFAULTS["erasing"], help="random erasing probability")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same run")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast on CPU and recent GPUs, fp16 on older GPUs")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (faster convolutions on CPU and tensor cores)")
    p.add_argument("--threads", type=positive(int), default=default_threads(), help="CPU threads")
    return p


def resolve_data(choice):
    if choice:
        return choice
    if Path("data").exists():
        print("using ./data (pass --data to choose another)")
        return "data"
    print("no --data given and no ./data folder: training on the built-in synthetic faces. "
          "For FER-2013, pass --data PATH (see README, 'Data').")
    return "synthetic"


def check_writable(run_dir, parameters):
    """Fail now, not after an hour of training, if checkpoints cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / ".write-test", "ok")
        (run_dir / ".write-test").unlink()
    except OSError as error:
        sys.exit(f"error: cannot write to {run_dir}: {error.strerror or error}. Choose another --out.")
    needed = parameters * 4 * 3 * 2 + 20_000_000  # weights and momentum, last and best, plus plots
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        sys.exit(f"error: {run_dir} has {free / 1e6:.0f} MB free; a run needs about {needed / 1e6:.0f} MB.")


def epoch_order(count, seed, epoch, device):
    """The shuffled order of epoch `epoch`: derived from (seed, epoch), so resuming needs no state."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(count, generator=generator).to(device)


@torch.inference_mode()
def evaluate_split(model, images, labels, device, precision, channels_last, batch_size):
    """Mean cross-entropy and accuracy of `model` on uint8 images already on `device`."""
    model.eval()
    # Summed on the device (in float64, as Python floats would be) and read once: no sync per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].float().div_(255)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[start:start + batch_size]
        with autocast(device, precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(labels), correct.item() / len(labels)


def build_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args):
    if args.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=args.min_lr)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=args.plateau_factor, patience=args.plateau_patience, min_lr=args.min_lr)


def train_step(model, optimizer, scaler, x, y, device, precision, label_smoothing):
    """One SGD step on a batch: (loss, correct predictions). A loss that is not finite is returned
    before any weight changes, so the caller can stop with the last good weights intact."""
    with autocast(device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    correct = (logits.argmax(1) == y).sum()
    loss_value, correct = torch.stack([loss.detach().float(), correct.float()]).tolist()  # one device sync
    if not math.isfinite(loss_value):
        return loss_value, 0
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss_value, int(correct)


def write_metrics(run_dir, metrics):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(metrics)
    write_text_atomic(run_dir / "metrics.csv", text.getvalue())


def plot_curves(run_dir, metrics, title):
    epochs = [m["epoch"] for m in metrics]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [m[f"{split}_loss"] for m in metrics], marker=".", label=split)
        acc_axis.plot(epochs, [100 * m[f"{split}_acc"] for m in metrics], marker=".", label=split)
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_axis.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy")
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    write_atomic(run_dir / "curves.png", lambda file: figure.savefig(file, format="png", dpi=100))
    plt.close(figure)


def divergence_message(name, what, lr, run_dir):
    return (f"error: {name}: the {what}. Kept {run_dir / 'last.pt'} from the last good epoch. The learning "
            f"rate {lr:g} is likely too high: try --lr {lr / 3:.2g}, or --precision fp32.")


# Set by Ctrl-C or SIGTERM; the loop checks it between batches, saves, and exits cleanly.
stop_requested = threading.Event()


def request_stop(signum, frame):
    stop_requested.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def train_model(name, args, train, val, run_dir, checkpoint):
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch is 48x48: cuDNN times its kernels once, keeps the fastest
    torch.manual_seed(args.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(name, len(train.classes)).to(device, memory_format=memory_format)
    size = describe_model(model)
    print(f"{name}: {size['parameters'] / 1e6:.2f} M parameters, {size['macs'] / 1e6:.0f} M multiply-adds "
          f"per image; {device.type}, {precision}, {len(train.labels)} training images")
    check_writable(run_dir, size["parameters"])
    for leftover in run_dir.glob(".*.tmp"):  # from a run killed while writing a file
        leftover.unlink()
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator(device).manual_seed(args.seed)
    progress = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0,
                "best_val_acc": -1.0, "best_val_loss": math.inf, "epochs_since_best_loss": 0, "stopped": ""}
    metrics = []
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        resume_optimizer(optimizer, checkpoint["optimizer"], checkpoint["config"]["lr"])
        resume_scheduler(scheduler, checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint["rng"], device, generator)
        progress, metrics = checkpoint["progress"], checkpoint["metrics"]
        print(f"{name}: resuming at epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    write_text_atomic(run_dir / "config.json", json.dumps({
        **vars(args), "model_name": name, "classes": train.classes, "size": size, "device": str(device),
        "resolved_precision": precision, "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}}, indent=2))

    def save(path):
        state = {"model_name": name, "classes": train.classes, "config": vars(args), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rng_state(device, generator), "progress": dict(progress),
                 "metrics": metrics}
        write_atomic(path, lambda file: torch.save(state, file))

    images, labels = train.images.to(device), train.labels.to(device)
    val_images, val_labels = val.images.to(device), val.labels.to(device)
    augmentation = {key: getattr(args, key) for key in AUGMENT_FLAGS}
    batches = math.ceil(len(labels) / args.batch_size)
    while progress["epoch"] < args.epochs and not progress["stopped"]:
        epoch = progress["epoch"]
        order = epoch_order(len(labels), args.seed, epoch, device)
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        bar = tqdm(range(progress["batch"], batches), desc=f"{name} epoch {epoch + 1}/{args.epochs}",
                   initial=progress["batch"], total=batches, unit="batch", disable=None, leave=False)
        started = time.perf_counter() - progress["seconds"]
        for batch in bar:
            index = order[batch * args.batch_size:(batch + 1) * args.batch_size]
            x = augment.augment_batch(images[index].float().div_(255), generator, **augmentation)
            x = x.contiguous(memory_format=memory_format)
            y = labels[index]
            loss_value, correct = train_step(model, optimizer, scaler, x, y, device, precision, args.label_smoothing)
            if not math.isfinite(loss_value):
                sys.exit(divergence_message(name, f"loss became {loss_value} at epoch {epoch + 1}, batch {batch + 1}",
                                            lr, run_dir))
            progress["loss_sum"] += loss_value * len(y)
            progress["correct"] += correct
            progress["seen"] += len(y)
            progress["batch"] = batch + 1
            if batch % 10 == 0:
                bar.set_postfix(loss=f"{progress['loss_sum'] / progress['seen']:.3f}")
            if stop_requested.is_set():
                progress["seconds"] = time.perf_counter() - started
                save(run_dir / "last.pt")
                print(f"\n{name}: interrupted at epoch {epoch + 1}, batch {batch + 1}; saved {run_dir / 'last.pt'}. "
                      f"Continue with: python train.py --resume --out {args.out} --models {name}")
                sys.exit(130)
        bar.close()
        seconds = time.perf_counter() - started
        val_loss, val_acc = evaluate_split(model, val_images, val_labels, device, precision, args.channels_last,
                                           args.batch_size)
        if not math.isfinite(val_loss):  # weights can overflow even while the batch losses stay finite
            sys.exit(divergence_message(name, f"validation loss became {val_loss} at epoch {epoch + 1}, "
                                        f"batch {batches}", lr, run_dir))
        metrics.append({"epoch": epoch + 1, "train_loss": round(progress["loss_sum"] / progress["seen"], 5),
                        "train_acc": round(progress["correct"] / progress["seen"], 5),
                        "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 5), "lr": lr,
                        "seconds": round(seconds, 2), "images_per_sec": round(progress["seen"] / seconds, 1)})
        print(f"{name} epoch {epoch + 1}/{args.epochs}: train loss {metrics[-1]['train_loss']:.3f} "
              f"acc {100 * metrics[-1]['train_acc']:.1f}% | val loss {val_loss:.3f} acc {100 * val_acc:.1f}% | "
              f"lr {lr:.3g} | {seconds:.0f} s, {metrics[-1]['images_per_sec']:.0f} img/s", flush=True)
        if args.schedule == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        improved_loss = val_loss < progress["best_val_loss"]
        progress.update(epoch=epoch + 1, batch=0, loss_sum=0.0, correct=0, seen=0, seconds=0.0,
                        best_val_loss=min(val_loss, progress["best_val_loss"]),
                        epochs_since_best_loss=0 if improved_loss else progress["epochs_since_best_loss"] + 1)
        at_floor = optimizer.param_groups[0]["lr"] <= args.min_lr * (1 + 1e-6)
        if at_floor and progress["epochs_since_best_loss"] > args.plateau_patience:
            progress["stopped"] = "learning rate at its floor and validation loss no longer improving"
        if val_acc > progress["best_val_acc"]:
            progress["best_val_acc"] = val_acc
            save(run_dir / "best.pt")  # before last.pt: a kill in between redoes this epoch identically
        save(run_dir / "last.pt")
        write_metrics(run_dir, metrics)
        plot_curves(run_dir, metrics, name)
    if metrics:
        write_metrics(run_dir, metrics)
        plot_curves(run_dir, metrics, name)
        reason = progress["stopped"] or f"reached --epochs {args.epochs}"
        print(f"{name}: stopped after epoch {progress['epoch']} ({reason}); best validation accuracy "
              f"{100 * progress['best_val_acc']:.2f}%. Saved {run_dir}/best.pt, metrics.csv, curves.png")


def with_model_epochs(args, name):
    """`args` with --epochs set: as given (or saved in the resumed run), else the model's default."""
    return argparse.Namespace(**{**vars(args), "epochs": args.epochs or DEFAULT_EPOCHS[name]})


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.resume and args.data is None:
        args.data = saved_data_source(Path(args.out) / args.models[0] / "last.pt")
    args.data = resolve_data(args.data)
    try:
        train, val = data.load_train_val(args.data)
    except data.DataError as error:
        sys.exit(f"error: {error}")
    print(f"data: {args.data}: {len(train.labels)} train, {len(val.labels)} validation images, "
          f"classes {', '.join(train.classes)}")
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    for name in args.models:
        run_dir = Path(args.out) / name
        checkpoint = open_run(name, args, train.classes, run_dir)
        config = resumed_config(args, parser, checkpoint) if checkpoint else args
        train_model(name, with_model_epochs(config, name), train, val, run_dir, checkpoint)


if __name__ == "__main__":
    main()
