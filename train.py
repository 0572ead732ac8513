"""Train the facial-expression CNNs of models.py with batch augmentation, SGD and a learning-rate
schedule (cosine decay by default, or reduced on plateau). One run folder per model under --out holds
metrics.csv, curves.png, config.json, last.pt (every epoch) and best.pt (best validation accuracy).

    python train.py --data ../shared/data/fer2013
    python train.py --resume            # continue an interrupted run where it stopped
    torchrun --standalone --nproc_per_node=2 train.py ...   # the same recipe on 2 GPUs: ferkit/distributed.py

The per-model epoch loop is train_model; main parses the flags and trains each model in turn.
"""
import argparse
import json
import math
import platform
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import data
from ferkit import cli
from ferkit import distributed
from ferkit.checkpoint import (given_flags, open_run, restore_rank_rng, resume_optimizer, resume_scheduler,
                               resumed_config, rng_state, saved_data_source, with_provenance)
from ferkit.device import autocast, resolve_precision
from ferkit.files import write_atomic, write_text_atomic
from ferkit.history import plot_curves, write_metrics
from models import MODELS, build_model, describe_model, fit_whitening, training_defaults

# Named sets of flag defaults, one per training-time budget on two CPU cores; a flag typed beside --budget
# wins. docs/results.md gives what each bought, measured by benchmarks/accuracy.py.
BUDGETS = {
    "10min": {"models": ["model_a"], "epochs": 27, "train_size": 40},
    "20min": {"models": ["model_y"], "epochs": 36},
    "45min": {"models": ["model_y"]},
    "90min": {},  # the defaults below
    "3h": {"models": ["model_x", "model_y", "model_z"]},
}


# ---------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------

def budget_flags(flags):
    """A budget's flags as typed on a command line."""
    def typed(value):
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)
    return " ".join(f"--{key.replace('_', '-')} {typed(value)}" for key, value in flags.items())


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="FER folder, FER-2013 CSV, or 'synthetic'; unset: ./data if it exists, else synthetic")
    p.add_argument("--budget", default="90min", choices=list(BUDGETS),
                   help="a named set of the flags' defaults for a training-time budget: "
                        + "; ".join(f"{name}: {budget_flags(flags) or 'as listed here'}"
                                    for name, flags in BUDGETS.items()))
    p.add_argument("--models", nargs="+", default=["model_x", "model_y"], choices=list(MODELS),
                   help="models to train, one after another")
    p.add_argument("--out", default="runs", help="folder for the run folders, one per model")
    p.add_argument("--resume", action="store_true",
                   help="continue each model's run from its last.pt; flags you pass override its saved ones")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run instead of refusing")
    p.add_argument("--epochs", type=cli.positive(int), default=None,
                   help="maximum epochs, for every model trained; None: each model's own, "
                        + ", ".join(f"{name} {training_defaults(name)['epochs']}" for name in MODELS))
    add_optimizer_flags(p)
    add_augmentation_flags(p)
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same run")
    cli.add_device_flags(p, batch_size=128, batch_help="training (and validation) batch size")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (faster convolutions on CPU and tensor cores)")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                   help="under torchrun: batch norm statistics over the whole global batch, not each process's "
                        "part (CUDA only; closest to one process's math, a little slower)")
    p.add_argument("--dist-timeout", type=cli.positive(float), default=120.0,
                   help="under torchrun: seconds a process waits for the others (to join, or in a collective) "
                        "before failing, so a killed or hung process ends the run instead of hanging it")
    return p


def add_optimizer_flags(p):
    """SGD's, the loss's and the learning-rate schedule's flags."""
    p.add_argument("--lr", type=cli.positive(float), default=None,
                   help="initial SGD learning rate, for every model trained; None: each model's own, "
                        + ", ".join(f"{name} {training_defaults(name)['lr']}" for name in MODELS))
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--label-smoothing", type=cli.probability, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--schedule", default="cosine", choices=["plateau", "cosine"],
                   help="how the learning rate falls: cosine (a cosine decay from the initial rate to the floor "
                        "over all epochs) or plateau (cut when validation loss stalls, the original project's "
                        "schedule)")
    p.add_argument("--plateau-patience", type=int, default=3,
                   help="plateau schedule: epochs without validation-loss improvement before the learning rate is "
                        "cut, or, once it is at --min-lr, before training stops")
    p.add_argument("--plateau-factor", type=cli.probability, default=0.3,
                   help="plateau schedule: learning-rate cut factor")
    p.add_argument("--min-lr", type=float, default=3e-4,
                   help="learning-rate floor; under --schedule plateau, training stops early once the rate is there "
                        "and validation loss has not improved for more than --plateau-patience epochs")


def add_augmentation_flags(p):
    """The flags of data.augment_batch, defaulting to data.AUGMENTATION_DEFAULTS."""
    defaults = data.AUGMENTATION_DEFAULTS
    p.add_argument("--hflip", type=cli.probability, default=defaults["hflip"], help="horizontal flip probability")
    p.add_argument("--vflip", type=cli.probability, default=defaults["vflip"],
                   help="vertical flip probability (faces are never upside down)")
    p.add_argument("--rotation", type=float, default=defaults["rotation"], help="maximum rotation, degrees")
    p.add_argument("--crop-scale", type=cli.probability, default=defaults["crop_scale"],
                   help="smallest area fraction of the random resized crop (1 = off)")
    p.add_argument("--brightness", type=cli.probability, default=defaults["brightness"],
                   help="maximum relative brightness change")
    p.add_argument("--contrast", type=cli.probability, default=defaults["contrast"],
                   help="maximum relative contrast change")
    p.add_argument("--erasing", type=cli.probability, default=defaults["erasing"], help="random erasing probability")
    p.add_argument("--train-size", type=cli.positive(int), default=defaults["train_size"],
                   help="train on random windows of this many pixels a side, cut at the images' scale (validation "
                        "and test keep the whole image); fewer pixels, faster epochs. None: the whole image. "
                        "For networks that pool globally (not model_x)")


def parse_args(argv=None):
    """The parser, with the defaults of the --budget given (or of the default budget), and the flags."""
    parser = build_parser()
    parser.set_defaults(**BUDGETS[parser.parse_known_args(argv)[0].budget])
    return parser, parser.parse_args(argv)


def with_model_defaults(args, name):
    """`args` with --epochs and --lr set: as given (or saved in the resumed run, or set by --budget), else
    the model's defaults."""
    settings = vars(args)
    return argparse.Namespace(**{**settings, **{key: value for key, value in training_defaults(name).items()
                                                if settings[key] is None}})


# ---------------------------------------------------------------------------------------------------
# One model's training: its parts, one SGD step, one epoch, validation, checkpoints, the epoch loop
# ---------------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after last.pt was saved; the message says how to continue."""


# Set by Ctrl-C or SIGTERM; the epoch checks it between batches, saves last.pt and raises Interrupted.
stop_requested = threading.Event()


def request_stop(signum, frame):
    stop_requested.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


@dataclass
class Trainer:
    """Everything one model's epochs work with, made once by set_up."""
    name: str
    args: argparse.Namespace  # this model's settings: flags, a resumed run's saved ones, its --epochs
    run_dir: Path
    classes: list
    device: torch.device
    precision: str  # resolved: bf16, fp16 or fp32
    model: torch.nn.Module  # what trains: under torchrun, `plain` in DistributedDataParallel
    plain: torch.nn.Module  # the network itself: validated and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # CosineAnnealingLR or ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # augmentation's random numbers, saved in every checkpoint
    images: torch.Tensor  # uint8 training images, on the device
    labels: torch.Tensor
    val_images: torch.Tensor  # this process's shard of the validation split
    val_labels: torch.Tensor


def fresh_progress():
    """Where a new run starts. Saved in every checkpoint: the batch and running sums let a run
    interrupted mid-epoch continue exactly; the best figures drive best.pt and the plateau stop."""
    return {"epoch": 0, "batch": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0,
            "best_val_acc": -1.0, "best_val_loss": math.inf, "epochs_since_best_loss": 0, "stopped": ""}


def build_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args):
    """The --schedule's torch.optim scheduler; it steps once per epoch (step_scheduler)."""
    if args.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=args.min_lr)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=args.plateau_factor, patience=args.plateau_patience, min_lr=args.min_lr)


def step_scheduler(scheduler, args, val_loss):
    if args.schedule == "plateau":
        scheduler.step(val_loss)
    else:
        scheduler.step()


def check_train_size(model, name, side):
    """Refuse a --train-size window larger than the images, or one that the network cannot take (one with a
    fixed-size classifier)."""
    if side is None:
        return
    if side > data.IMAGE_SIZE:
        raise SystemExit(f"--train-size {side} is larger than the {data.IMAGE_SIZE}x{data.IMAGE_SIZE} images; "
                         f"choose at most {data.IMAGE_SIZE}.")
    try:
        describe_model(model, side)
    except RuntimeError as error:
        raise SystemExit(f"{name} cannot train on {side}x{side} windows (--train-size {side}): {error}. "
                         "Leave --train-size unset, or choose a model that pools globally.") from None


def set_up(name, args, train, val, run_dir, checkpoint):
    """(Trainer, progress, metrics) of one model: built from `args`, and put back where `checkpoint`
    (None for a new run) left it. Writes config.json."""
    device = distributed.device_for(args.device)
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch is 48x48: cuDNN times its kernels once, keeps the fastest
    torch.manual_seed(args.seed)  # the same initial weights in every process
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(name, len(train.classes))
    fit_whitening(model, train.images)  # a resumed run's saved weights replace it
    model = model.to(device, memory_format=memory_format)
    size = describe_model(model)
    # weights and momentum, in last.pt and best.pt, plus plots
    distributed.on_master(cli.check_writable, run_dir, size["parameters"] * 4 * 3 * 2 + 20_000_000)
    if distributed.is_master():
        announce(name, size, device, precision, train, run_dir)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    rank = distributed.rank()
    generator = torch.Generator(device).manual_seed(distributed.rank_seed(args.seed, rank))
    if rank:  # each process its own dropout (and augmentation): seeded from (seed, rank)
        torch.manual_seed(distributed.rank_seed(args.seed, rank))
    progress, metrics = fresh_progress(), []
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        resume_optimizer(optimizer, checkpoint["optimizer"], checkpoint["config"]["lr"])
        resume_scheduler(scheduler, checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rank_rng(checkpoint, rank, args.seed, device, generator)
        progress, metrics = checkpoint["progress"], checkpoint["metrics"]
        if distributed.is_master():
            print(f"{name}: resuming at epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    if distributed.is_master():
        write_config(run_dir, args, name, train.classes, size, device, precision)
    wrapped, plain = distributed.wrap(model, device, args.sync_bn)
    trainer = Trainer(name, args, run_dir, train.classes, device, precision, wrapped, plain, optimizer, scheduler,
                      scaler, generator, train.images.to(device), train.labels.to(device),
                      distributed.shard(val.images).to(device), distributed.shard(val.labels).to(device))
    return trainer, progress, metrics


def announce(name, size, device, precision, train, run_dir):
    print(f"{name}: {size['parameters'] / 1e6:.2f} M parameters, {size['macs'] / 1e6:.0f} M multiply-adds "
          f"per image; {device.type}, {precision}, {len(train.labels)} training images"
          + (f"; {distributed.world_size()} processes" if distributed.launched() else ""))
    for leftover in run_dir.glob(".*.tmp"):  # from a run killed while writing a file
        leftover.unlink()


def write_config(run_dir, args, name, classes, size, device, precision):
    write_text_atomic(run_dir / "config.json", json.dumps({
        **vars(args), "model_name": name, "classes": classes, "size": size, "device": str(device),
        "resolved_precision": precision, "processes": distributed.world_size(), "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}}, indent=2))


def epoch_order(count, seed, epoch, device):
    """The shuffled order of epoch `epoch`: derived from (seed, epoch), so resuming needs no state."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(count, generator=generator).to(device)


def train_step(model, optimizer, scaler, x, y, device, precision, label_smoothing, batch_images=None, stop=False):
    """One SGD step on this process's part (x, y) of a batch of `batch_images` images (default: all of
    it): (mean loss, correct predictions, images) over the whole batch, and whether any process was asked
    to `stop`. A loss that is not finite is returned before any weight changes, on every process alike, so
    the caller can stop with the last good weights intact."""
    with autocast(device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    correct = (logits.argmax(1) == y).sum()
    counts = torch.tensor([len(y), stop], dtype=torch.float64, device=device)
    totals = torch.cat([torch.stack([loss.detach().double() * len(y), correct.double()]), counts])
    loss_sum, correct, seen, stop = distributed.all_reduce_sum(totals).tolist()  # one device sync
    if not math.isfinite(loss_sum):
        return loss_sum, 0, int(seen), stop > 0
    # DDP averages the processes' gradients: weighting each part by its share of the batch makes that
    # the gradient of the whole batch's mean loss, as one process computes it (1 in a single process).
    share = len(y) * distributed.world_size() / (batch_images or len(y))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss if share == 1 else loss * share).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss_sum / seen, int(correct), int(seen), stop > 0


def augmented_batch(trainer, index):
    """The training images at `index`, augmented, as floats in [0, 1] in the training memory format."""
    x = data.augment_batch(trainer.images[index].float().div_(255), trainer.generator,
                           **data.augmentation_settings(trainer.args))
    return x.contiguous(memory_format=torch.channels_last if trainer.args.channels_last else torch.contiguous_format)


def progress_bar(trainer, epoch, first_batch, batches):
    """A tqdm bar over the epoch's batches, on a terminal only (disable=None: off when stderr is a file or
    a pipe, so logs get the one line per epoch printed after it, not its updates), and on rank 0 only."""
    return tqdm(range(first_batch, batches), desc=f"{trainer.name} epoch {epoch + 1}/{trainer.args.epochs}",
                initial=first_batch, total=batches, unit="batch", leave=False,
                disable=None if distributed.is_master() else True)


def train_one_epoch(trainer, progress, metrics):
    """Train on epoch progress["epoch"] from batch progress["batch"] on (not 0 when resumed mid-epoch):
    the epoch's sums (loss_sum, correct, seen) and seconds. Ctrl-C or SIGTERM on any process: every
    process saves last.pt and raises Interrupted."""
    args, epoch = trainer.args, progress["epoch"]
    order = epoch_order(len(trainer.labels), args.seed, epoch, trainer.device)
    batches = math.ceil(len(trainer.labels) / args.batch_size)
    sums = {key: progress[key] for key in ("batch", "loss_sum", "correct", "seen")}
    started = time.perf_counter() - progress["seconds"]
    trainer.model.train()
    bar = progress_bar(trainer, epoch, progress["batch"], batches)
    for batch in bar:
        whole = order[batch * args.batch_size:(batch + 1) * args.batch_size]
        index = distributed.shard(whole)  # this process's part of the batch
        loss, correct, seen, stop = train_step(
            trainer.model, trainer.optimizer, trainer.scaler, augmented_batch(trainer, index), trainer.labels[index],
            trainer.device, trainer.precision, args.label_smoothing, len(whole), stop_requested.is_set())
        if not math.isfinite(loss):
            raise cli.UsageError(divergence_message(trainer, f"loss became {loss} at epoch {epoch + 1}, "
                                                             f"batch {batch + 1}"))
        sums = {"batch": batch + 1, "loss_sum": sums["loss_sum"] + loss * seen,
                "correct": sums["correct"] + correct, "seen": sums["seen"] + seen}
        if batch % 10 == 0:
            bar.set_postfix(loss=f"{sums['loss_sum'] / sums['seen']:.3f}")
        if stop:  # Ctrl-C or SIGTERM reached at least one process: all of them stop here
            bar.close()
            save_checkpoint(trainer, "last.pt", {**progress, **sums, "seconds": time.perf_counter() - started}, metrics)
            raise Interrupted(interrupted_message(trainer, epoch, batch))
    bar.close()
    return {**sums, "seconds": time.perf_counter() - started}


def interrupted_message(trainer, epoch, batch):
    return (f"\n{trainer.name}: interrupted at epoch {epoch + 1}, batch {batch + 1}; saved "
            f"{trainer.run_dir}/last.pt. Continue with: python train.py --resume --out {trainer.args.out} "
            f"--models {trainer.name}"
            + (" (or under torchrun, with any number of processes)" if distributed.launched() else ""))


def divergence_message(trainer, what):
    lr = trainer.optimizer.param_groups[0]["lr"]
    return (f"{trainer.name}: the {what}. Kept {trainer.run_dir / 'last.pt'} from the last good epoch. The learning "
            f"rate {lr:g} is likely too high: try --lr {lr / 3:.2g}, or --precision fp32.")


@torch.inference_mode()
def evaluate_split(model, images, labels, device, precision, channels_last, batch_size):
    """Mean cross-entropy and accuracy of `model` on uint8 images already on `device`; under torchrun,
    each process passes its shard of the split and the sums are added up over the processes."""
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
    count = torch.tensor(len(labels), dtype=torch.float64, device=device)
    loss_sum, correct, count = distributed.all_reduce_sum(torch.stack([loss_sum, correct.double(), count])).tolist()
    return loss_sum / count, correct / count


def validate(trainer, epoch):
    """(validation loss, accuracy) of the weights after `epoch` (counted from 0)."""
    distributed.average_buffers(trainer.plain)  # batch norm's running statistics: one model on every process
    args = trainer.args
    val_loss, val_acc = evaluate_split(trainer.plain, trainer.val_images, trainer.val_labels, trainer.device,
                                       trainer.precision, args.channels_last, args.batch_size)
    if not math.isfinite(val_loss):  # weights can overflow even while the batch losses stay finite
        batches = math.ceil(len(trainer.labels) / args.batch_size)
        raise cli.UsageError(divergence_message(
            trainer, f"validation loss became {val_loss} at epoch {epoch + 1}, batch {batches}"))
    return val_loss, val_acc


def save_checkpoint(trainer, filename, progress, metrics):
    """Write run_dir/filename (last.pt or best.pt), a plain dict; every process takes part (each hands
    in its random-number state), rank 0 writes it."""
    rngs = distributed.gather(rng_state(trainer.device, trainer.generator))
    if not distributed.is_master():
        return
    state = {"model_name": trainer.name, "classes": trainer.classes, "config": vars(trainer.args),
             "model": trainer.plain.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
             "rng": rngs[0], "rank_rng": rngs[1:], "progress": dict(progress), "metrics": metrics}
    write_atomic(trainer.run_dir / filename, lambda file: torch.save(state, file))


def epoch_metrics(epoch, sums, val_loss, val_acc, lr):
    """metrics.csv's row for `epoch` (counted from 0)."""
    return {"epoch": epoch + 1, "train_loss": round(sums["loss_sum"] / sums["seen"], 5),
            "train_acc": round(sums["correct"] / sums["seen"], 5), "val_loss": round(val_loss, 5),
            "val_acc": round(val_acc, 5), "lr": lr, "seconds": round(sums["seconds"], 4),
            "images_per_sec": round(sums["seen"] / sums["seconds"], 1)}


def print_epoch(name, epochs, row):
    print(f"{name} epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.3f} acc "
          f"{100 * row['train_acc']:.1f}% | val loss {row['val_loss']:.3f} acc {100 * row['val_acc']:.1f}% | "
          f"lr {row['lr']:.3g} | {row['seconds']:.0f} s, {row['images_per_sec']:.0f} img/s", flush=True)


def progress_after_epoch(progress, args, val_loss, val_acc, lr_now):
    """The progress saved after an epoch: the next epoch from its first batch, the best figures, and
    why training stops early, if it does (only the plateau schedule does: cosine reaches --min-lr only
    after its last epoch)."""
    improved_loss = val_loss < progress["best_val_loss"]
    since_best = 0 if improved_loss else progress["epochs_since_best_loss"] + 1
    at_floor = lr_now <= args.min_lr * (1 + 1e-6)
    stalled = args.schedule == "plateau" and at_floor and since_best > args.plateau_patience
    return {**progress, "epoch": progress["epoch"] + 1, "batch": 0, "loss_sum": 0.0, "correct": 0, "seen": 0,
            "seconds": 0.0, "best_val_acc": max(val_acc, progress["best_val_acc"]),
            "best_val_loss": min(val_loss, progress["best_val_loss"]), "epochs_since_best_loss": since_best,
            "stopped": "learning rate at its floor and validation loss no longer improving" if stalled else ""}


def train_model(name, args, train, val, run_dir, checkpoint):
    """Train one model for args.epochs epochs (or until the plateau schedule stops it), continuing
    `checkpoint` if given; best.pt, last.pt, metrics.csv and curves.png are rewritten after every epoch."""
    trainer, progress, metrics = set_up(name, args, train, val, run_dir, checkpoint)
    master = distributed.is_master()
    while progress["epoch"] < args.epochs and not progress["stopped"]:
        epoch, lr = progress["epoch"], trainer.optimizer.param_groups[0]["lr"]
        sums = train_one_epoch(trainer, progress, metrics)
        val_loss, val_acc = validate(trainer, epoch)
        metrics.append(epoch_metrics(epoch, sums, val_loss, val_acc, lr))
        if master:
            print_epoch(name, args.epochs, metrics[-1])
        step_scheduler(trainer.scheduler, args, val_loss)
        improved = val_acc > progress["best_val_acc"]
        progress = progress_after_epoch(progress, args, val_loss, val_acc, trainer.optimizer.param_groups[0]["lr"])
        if improved:  # best.pt before last.pt: a kill in between redoes this epoch identically
            save_checkpoint(trainer, "best.pt", progress, metrics)
        save_checkpoint(trainer, "last.pt", progress, metrics)
        if master:
            write_metrics(run_dir, metrics)
            plot_curves(run_dir, metrics, name)
    if metrics and master:
        reason = progress["stopped"] or f"reached --epochs {args.epochs}"
        print(f"{name}: stopped after epoch {progress['epoch']} ({reason}); best validation accuracy "
              f"{100 * progress['best_val_acc']:.2f}%. Saved {run_dir}/best.pt, metrics.csv, curves.png")


# ---------------------------------------------------------------------------------------------------
# The command line: every model's checks first, then each model in turn
# ---------------------------------------------------------------------------------------------------

def resolve_data(choice):
    if choice:
        return choice
    if Path("data").exists():
        print("using ./data (pass --data to choose another)")
        return "data"
    print("no --data given and no ./data folder: training on the built-in synthetic faces. "
          "For FER-2013, pass --data PATH (see README, 'Data').")
    return "synthetic"


def load_data(args):
    """(train, validation) splits of --data (a resumed run's own when --data is not given)."""
    if args.resume and args.data is None:
        args.data = distributed.on_master(saved_data_source, Path(args.out) / args.models[0] / "last.pt")
    args.data = distributed.on_master(resolve_data, args.data)
    train, val = data.load_train_val(args.data)
    if distributed.is_master():
        print(f"data: {args.data}: {len(train.labels)} train, {len(val.labels)} validation images, "
              f"classes {', '.join(train.classes)}")
    return train, val


def checked_run(name, args, given, invocation, train):
    """(run folder, checkpoint to resume or None, settings) for one model, after every check on its own
    settings: run for each model before the first trains, so that a run refused for the last model does
    not wait behind hours of training the others."""
    run_dir = Path(args.out) / name
    # Rank 0 reads the run folder (perhaps on its disk only) and hands the checkpoint to every process.
    checkpoint = distributed.on_master(open_run, name, args, train.classes, run_dir)
    config = resumed_config(args, given, checkpoint) if checkpoint else args
    config = with_provenance(with_model_defaults(config, name), checkpoint, invocation)
    check_train_size(build_model(name, len(train.classes)), name, config.train_size)
    device = distributed.device_for(config.device)
    distributed.check_launch(config.batch_size, config.sync_bn, device, len(train.labels))
    return run_dir, checkpoint, config


def start_processes(args, given):
    """Threads and, under torchrun, the process group; settings the processes cannot share are refused
    first, on every process (a resumed run's are checked once read, in checked_run)."""
    device = distributed.device_for(args.device)
    if not args.resume:
        distributed.check_launch(args.batch_size, args.sync_bn, device)
    torch.set_num_threads(args.threads if "threads" in given else distributed.threads_per_process(args.threads))
    distributed.setup(device, args.dist_timeout)  # joins the process group under torchrun; nothing otherwise


def main(argv=None):
    parser, args = parse_args(argv)
    # Every model trains on the data loaded below (a resumed run's own unless --data is given): it counts as given.
    given = given_flags(parser, argv) | {"data"}
    invocation = shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)])
    start_processes(args, given)
    try:
        train, val = load_data(args)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        runs = [checked_run(name, args, given, invocation, train) for name in args.models]  # before any trains
        for name, (run_dir, checkpoint, config) in zip(args.models, runs):
            train_model(name, config, train, val, run_dir, checkpoint)
    except Interrupted as interrupted:
        if distributed.is_master():
            print(interrupted, flush=True)
        sys.exit(130)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    cli.run(main)
