"""Train the facial-expression CNNs of models.py with batch augmentation, SGD and a learning-rate
schedule (cosine decay by default, or reduced on plateau). One run folder per model under --out holds
metrics.csv, curves.png, config.json, last.pt (every epoch) and best.pt (best validation accuracy).

    python train.py --data ../shared/data/fer2013
    python train.py --resume            # continue an interrupted run where it stopped
    torchrun --standalone --nproc_per_node=2 train.py ...   # the same recipe on 2 GPUs: distributed.py
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
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from ferkit import augment
from ferkit import averaging
from ferkit import cli
import data
from ferkit import distill
from ferkit import distributed
from ferkit import schedule
from ferkit.files import write_atomic, write_text_atomic
from ferkit.history import plot_curves, write_metrics
from ferkit.device import autocast, resolve_precision
from models import MODELS, build_model, default_epochs, describe_model
from ferkit.checkpoint import (given_flags, open_run, restore_rank_rng, resume_optimizer, resume_scheduler, resumed_config,
                    rng_state, saved_data_source, with_provenance)

# Named sets of flag defaults, one per training-time budget on two CPU cores; a flag typed beside --budget
# wins. docs/results.md gives what each bought, measured by benchmarks/accuracy.py.
BUDGETS = {
    "20min": {"models": ["model_y"], "epochs": 36},
    "45min": {"models": ["model_y"]},
    "90min": {},  # the defaults below
    "3h": {"models": ["model_x", "model_y", "model_z"]},
}


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
                        + ", ".join(f"{name} {default_epochs(name)}" for name in MODELS))
    p.add_argument("--lr", type=cli.positive(float), default=0.03, help="initial SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--label-smoothing", type=cli.probability, default=0.1, help="cross-entropy label smoothing")
    schedule.add_flags(p)
    augment.add_flags(p)
    distill.add_flags(p)
    p.add_argument("--ema-decay", type=cli.probability, default=0.0,
                   help="keep an exponential moving average of the weights with this decay per step (0 = off); "
                        "when on, the average (batch-norm statistics re-measured) is validated and saved as best.pt")
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


def resolve_data(choice):
    if choice:
        return choice
    if Path("data").exists():
        print("using ./data (pass --data to choose another)")
        return "data"
    print("no --data given and no ./data folder: training on the built-in synthetic faces. "
          "For FER-2013, pass --data PATH (see README, 'Data').")
    return "synthetic"


def epoch_order(count, seed, epoch, device):
    """The shuffled order of epoch `epoch`: derived from (seed, epoch), so resuming needs no state."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(count, generator=generator).to(device)


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


def build_optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)


def train_step(model, optimizer, scaler, x, y, device, precision, label_smoothing, batch_images=None, stop=False):
    """One SGD step on this process's part (x, y) of a batch of `batch_images` images (default: all of
    it; y: class indices, or class probabilities from mixup, CutMix or distillation, whose largest
    counts as the label): (mean loss, correct predictions, images) over the whole batch, and whether
    any process was asked to `stop`. A loss that is not finite is returned before any weight changes, on every
    process alike, so the caller can stop with the last good weights intact."""
    with autocast(device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    correct = (logits.argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
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


def divergence_message(name, what, lr, run_dir):
    return (f"{name}: the {what}. Kept {run_dir / 'last.pt'} from the last good epoch. The learning "
            f"rate {lr:g} is likely too high: try --lr {lr / 3:.2g}, or --precision fp32.")


# Set by Ctrl-C or SIGTERM; the loop checks it between batches, saves, and exits cleanly.
stop_requested = threading.Event()


def request_stop(signum, frame):
    stop_requested.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def train_model(name, args, train, val, run_dir, checkpoint, teacher=None):
    device = distributed.device_for(args.device)
    rank, master = distributed.rank(), distributed.is_master()
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch is 48x48: cuDNN times its kernels once, keeps the fastest
    torch.manual_seed(args.seed)  # the same initial weights in every process
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(name, len(train.classes)).to(device, memory_format=memory_format)
    size = describe_model(model)
    # weights and momentum, in last.pt and best.pt, plus plots
    distributed.on_master(cli.check_writable, run_dir, size["parameters"] * 4 * 3 * 2 + 20_000_000)
    if master:
        print(f"{name}: {size['parameters'] / 1e6:.2f} M parameters, {size['macs'] / 1e6:.0f} M multiply-adds "
              f"per image; {device.type}, {precision}, {len(train.labels)} training images"
              + (f"; {distributed.world_size()} processes" if distributed.launched() else ""))
        for leftover in run_dir.glob(".*.tmp"):  # from a run killed while writing a file
            leftover.unlink()
    optimizer = build_optimizer(model, args)
    scheduler = schedule.build(optimizer, args)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator(device).manual_seed(distributed.rank_seed(args.seed, rank))
    if rank:  # each process its own dropout (and augmentation): seeded from (seed, rank)
        torch.manual_seed(distributed.rank_seed(args.seed, rank))
    progress = {"epoch": 0, "batch": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0,
                "best_val_acc": -1.0, "best_val_loss": math.inf, "epochs_since_best_loss": 0, "stopped": ""}
    metrics = []
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        resume_optimizer(optimizer, checkpoint["optimizer"], checkpoint["config"]["lr"])
        resume_scheduler(scheduler, checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rank_rng(checkpoint, rank, args.seed, device, generator)
        progress, metrics = checkpoint["progress"], checkpoint["metrics"]
        if master:
            print(f"{name}: resuming at epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    if master:
        write_text_atomic(run_dir / "config.json", json.dumps({
            **vars(args), "model_name": name, "classes": train.classes, "size": size, "device": str(device),
            "resolved_precision": precision, "processes": distributed.world_size(), "versions": {
                "python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__}}, indent=2))
    # Under torchrun `model` is the DistributedDataParallel wrapper that trains; `plain` is validated and saved.
    model, plain = distributed.wrap(model, device, args.sync_bn)
    average = (averaging.moving_average(plain, args.ema_decay) if args.ema_decay
               else averaging.equal_average(plain) if args.swa_epochs else None)
    if average is not None and checkpoint and checkpoint["average"]:  # else it starts now (--resume turned it on)
        average.load_state_dict(checkpoint["average"])
    mix = augment.batch_mixer(args.mixup, args.cutmix, args.mix_prob, len(train.classes))

    def save(path, weights):
        rngs = distributed.gather(rng_state(device, generator))  # every process takes part; rank 0 writes
        if master:
            state = {"model_name": name, "classes": train.classes, "config": vars(args), "model": weights.state_dict(),
                     "average": average.state_dict() if average is not None else None,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rngs[0], "rank_rng": rngs[1:], "progress": dict(progress),
                     "metrics": metrics}
            write_atomic(path, lambda file: torch.save(state, file))

    images, labels = train.images.to(device), train.labels.to(device)
    targets = labels if teacher is None else distill.soft_targets(labels, teacher, args.distill_weight)
    val_images, val_labels = distributed.shard(val.images).to(device), distributed.shard(val.labels).to(device)
    augmentation = augment.settings(args)

    def augmented(index):
        x = augment.augment_batch(images[index].float().div_(255), generator, **augmentation)
        return x.contiguous(memory_format=memory_format)

    def validate(network):
        return evaluate_split(network, val_images, val_labels, device, precision, args.channels_last, args.batch_size)

    batches = math.ceil(len(labels) / args.batch_size)
    while progress["epoch"] < args.epochs and not progress["stopped"]:
        epoch = progress["epoch"]
        order = epoch_order(len(labels), args.seed, epoch, device)
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        bar = tqdm(range(progress["batch"], batches), desc=f"{name} epoch {epoch + 1}/{args.epochs}",
                   initial=progress["batch"], total=batches, unit="batch", disable=None if master else True,
                   leave=False)
        started = time.perf_counter() - progress["seconds"]
        for batch in bar:
            whole = order[batch * args.batch_size:(batch + 1) * args.batch_size]
            index = distributed.shard(whole)  # this process's part of the batch
            x, y = augmented(index), targets[index]
            if mix:
                x, y = mix(x, y)
            loss_value, correct, seen, stop = train_step(model, optimizer, scaler, x, y, device, precision,
                                                         args.label_smoothing, len(whole), stop_requested.is_set())
            if args.ema_decay:
                average.update_parameters(plain)
            if not math.isfinite(loss_value):
                raise cli.UsageError(divergence_message(
                    name, f"loss became {loss_value} at epoch {epoch + 1}, batch {batch + 1}", lr, run_dir))
            progress["loss_sum"] += loss_value * seen
            progress["correct"] += correct
            progress["seen"] += seen
            progress["batch"] = batch + 1
            if batch % 10 == 0:
                bar.set_postfix(loss=f"{progress['loss_sum'] / progress['seen']:.3f}")
            if stop:  # Ctrl-C or SIGTERM reached at least one process: all of them stop here
                progress["seconds"] = time.perf_counter() - started
                save(run_dir / "last.pt", plain)
                if master:
                    print(f"\n{name}: interrupted at epoch {epoch + 1}, batch {batch + 1}; saved {run_dir}/last.pt. "
                          f"Continue with: python train.py --resume --out {args.out} --models {name}"
                          + (" (or under torchrun, with any number of processes)" if distributed.launched() else ""))
                sys.exit(130)
        bar.close()
        seconds = time.perf_counter() - started
        distributed.average_buffers(plain)  # batch norm's running statistics: one model on every process
        val_loss, val_acc = validate(plain)
        if not math.isfinite(val_loss):  # weights can overflow even while the batch losses stay finite
            raise cli.UsageError(divergence_message(
                name, f"validation loss became {val_loss} at epoch {epoch + 1}, batch {batches}", lr, run_dir))
        if schedule.is_averaging(args, epoch):
            average.update_parameters(plain)
        averaged = average is not None and average.n_averaged > 0
        average_val_acc = ""
        if averaged:
            bn_batches = (augmented(distributed.shard(order[i * args.batch_size:(i + 1) * args.batch_size]))
                          for i in range(min(averaging.BN_BATCHES, batches)))
            average_val_acc = averaging.validate_average(average, bn_batches, autocast(device, precision), validate)[1]
        metrics.append({"epoch": epoch + 1, "train_loss": round(progress["loss_sum"] / progress["seen"], 5),
                        "train_acc": round(progress["correct"] / progress["seen"], 5),
                        "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 5),
                        "average_val_acc": round(average_val_acc, 5) if averaged else "", "lr": lr,
                        "seconds": round(seconds, 4), "images_per_sec": round(progress["seen"] / seconds, 1)})
        if master:
            print(f"{name} epoch {epoch + 1}/{args.epochs}: train loss {metrics[-1]['train_loss']:.3f} "
                  f"acc {100 * metrics[-1]['train_acc']:.1f}% | val loss {val_loss:.3f} acc {100 * val_acc:.1f}% "
                  + (f"(average {100 * average_val_acc:.1f}%) " if averaged else "")
                  + f"| lr {lr:.3g} | {seconds:.0f} s, {metrics[-1]['images_per_sec']:.0f} img/s", flush=True)
        if args.schedule == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        improved_loss = val_loss < progress["best_val_loss"]
        progress.update(epoch=epoch + 1, batch=0, loss_sum=0.0, correct=0, seen=0, seconds=0.0,
                        best_val_loss=min(val_loss, progress["best_val_loss"]),
                        epochs_since_best_loss=0 if improved_loss else progress["epochs_since_best_loss"] + 1)
        # Only the plateau schedule stops early: cosine reaches --min-lr only after its last epoch.
        at_floor = optimizer.param_groups[0]["lr"] <= args.min_lr * (1 + 1e-6)
        if args.schedule == "plateau" and at_floor and progress["epochs_since_best_loss"] > args.plateau_patience:
            progress["stopped"] = "learning rate at its floor and validation loss no longer improving"
        score = average_val_acc if averaged else val_acc  # what best.pt would hold
        if score > progress["best_val_acc"]:
            progress["best_val_acc"] = score
            # before last.pt: a kill in between redoes this epoch identically
            save(run_dir / "best.pt", average.module if averaged else plain)
        if args.restarts > 1 and (epoch + 1) % (args.epochs // args.restarts) == 0:
            save(run_dir / f"snapshot_{(epoch + 1) * args.restarts // args.epochs}.pt", plain)
        save(run_dir / "last.pt", plain)
        if master:
            write_metrics(run_dir, metrics)
            plot_curves(run_dir, metrics, name)
    if metrics and master:  # metrics.csv and curves.png were written after the last epoch
        reason = progress["stopped"] or f"reached --epochs {args.epochs}"
        print(f"{name}: stopped after epoch {progress['epoch']} ({reason}); best validation accuracy "
              f"{100 * progress['best_val_acc']:.2f}%. Saved {run_dir}/best.pt, metrics.csv, curves.png")


def with_model_epochs(args, name):
    """`args` with --epochs set: as given (or saved in the resumed run, or set by --budget), else the
    model's default."""
    return argparse.Namespace(**{**vars(args), "epochs": args.epochs or default_epochs(name)})


def parse_args(argv=None):
    """The parser, with the defaults of the --budget given (or of the default budget), and the flags."""
    parser = build_parser()
    parser.set_defaults(**BUDGETS[parser.parse_known_args(argv)[0].budget])
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    distill.check_flags(args)
    # Every model trains on the data loaded below (a resumed run's own unless --data is given): it counts as given.
    given = given_flags(parser, argv) | {"data"}
    invocation = shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)])
    device = distributed.device_for(args.device)
    if not args.resume:  # under torchrun: before any work, on every process (a resumed run's, once read)
        distributed.check_launch(args.batch_size, args.sync_bn, device)
    torch.set_num_threads(args.threads if "threads" in given else distributed.threads_per_process(args.threads))
    distributed.setup(device, args.dist_timeout)  # joins the process group under torchrun; nothing otherwise
    try:
        train_models(args, given, invocation)
    finally:
        distributed.teardown()


def train_models(args, given, invocation):
    master = distributed.is_master()
    if args.resume and args.data is None:
        args.data = distributed.on_master(saved_data_source, Path(args.out) / args.models[0] / "last.pt")
    args.data = distributed.on_master(resolve_data, args.data)
    train, val = data.load_train_val(args.data)
    if master:
        print(f"data: {args.data}: {len(train.labels)} train, {len(val.labels)} validation images, "
              f"classes {', '.join(train.classes)}")
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    runs = [checked_run(name, args, given, invocation, train) for name in args.models]  # before any trains
    teachers = {}  # --teacher's probabilities by (files, TTA, device, precision): made once for the models sharing them
    for name, (run_dir, checkpoint, config, device) in zip(args.models, runs):
        key = (tuple(config.teacher or ()), config.teacher_tta, device, resolve_precision(config.precision, device))
        if key not in teachers:
            teachers[key] = distill.teacher_probabilities(config.teacher, train, config.teacher_tta, device, key[3])
        train_model(name, config, train, val, run_dir, checkpoint, teachers[key])


def checked_run(name, args, given, invocation, train):
    """(run folder, checkpoint to resume or None, settings, device) for one model, after every check
    on its own settings: run for each model before the first trains, so that a flag refused for the last
    model does not wait behind hours of training the others."""
    run_dir = Path(args.out) / name
    # Rank 0 reads the run folder (perhaps on its disk only) and hands the checkpoint to every process.
    checkpoint = distributed.on_master(open_run, name, args, train.classes, run_dir)
    config = resumed_config(args, given, checkpoint) if checkpoint else args
    config = with_provenance(with_model_epochs(config, name), checkpoint, invocation)
    distill.check_flags(config)  # again: a resumed run's saved --teacher meets the --mixup given now
    schedule.check_flags(config)  # on this model's own --epochs
    device = distributed.device_for(config.device)
    distributed.check_launch(config.batch_size, config.sync_bn, device, len(train.labels))
    return run_dir, checkpoint, config, device


if __name__ == "__main__":
    cli.run(main)
