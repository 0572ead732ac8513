"""Continuing an interrupted training run: whether the run folder's checkpoint fits, the settings the
run continues with (the saved ones, overridden by the flags given now), and putting the optimizer,
scheduler and random-number generators back where they were."""
import argparse
import sys

import torch

from models import load_checkpoint


def open_run(name, args, classes, run_dir):
    """The saved state to continue from (None for a fresh run), after checking it fits."""
    last = run_dir / "last.pt"
    if not args.resume:
        if last.exists() and not args.overwrite:
            sys.exit(f"error: {run_dir} already holds a run. Pass --resume to continue it, --overwrite to "
                     "replace it, or --out to train elsewhere.")
        return None
    if not last.exists():
        sys.exit(f"error: --resume: no {last}. Start the run without --resume.")
    try:
        checkpoint = load_checkpoint(last)
    except ValueError as error:
        sys.exit(f"error: --resume: {error}")
    if checkpoint.get("model_name") != name or checkpoint.get("classes") != classes:
        sys.exit(f"error: --resume: {last} is a {checkpoint.get('model_name')} run on classes "
                 f"{checkpoint.get('classes')}, not {name} on {classes}. Use another --out.")
    return checkpoint


def saved_data_source(last):
    """The --data of the run being resumed, so `--resume` alone continues on the same data."""
    try:
        return load_checkpoint(last)["config"]["data"]
    except (FileNotFoundError, ValueError, KeyError):
        return None  # open_run explains what is wrong with the checkpoint


def resumed_config(args, parser, checkpoint):
    """The run's saved settings, overridden by the flags given on this command line."""
    config = dict(checkpoint["config"])
    for key, value in vars(args).items():
        if value != parser.get_default(key) or key not in config:
            config[key] = value
    saved_schedule = checkpoint["config"].get("schedule", config["schedule"])
    if config["schedule"] != saved_schedule:  # one scheduler's state means nothing to the other
        sys.exit(f"error: --resume: this run was trained with --schedule {saved_schedule}; it cannot switch to "
                 f"--schedule {config['schedule']}. Resume without --schedule, or start a new run with --out.")
    return argparse.Namespace(**config)


# The parts of a scheduler's state that come from flags; the rest (epoch count, best loss, ...) is progress.
SCHEDULER_SETTINGS = ("T_max", "eta_min", "factor", "patience", "min_lrs", "default_min_lr")


def resume_scheduler(scheduler, saved_state):
    """Progress from the checkpoint, settings from the flags, so flags given with --resume win: a
    longer --epochs stretches the remaining cosine decay instead of restarting it."""
    settings = {key: value for key, value in scheduler.state_dict().items() if key in SCHEDULER_SETTINGS}
    scheduler.load_state_dict({**saved_state, **settings})


# The optimizer settings that come from flags; momentum buffers and the scheduled rate are progress.
OPTIMIZER_SETTINGS = ("momentum", "nesterov", "weight_decay")


def resume_optimizer(optimizer, saved_state, saved_lr):
    """Progress from the checkpoint, settings from the flags (as the fresh optimizer holds them), so
    --momentum and --weight-decay given with --resume take effect, and an --lr that differs from the run's
    replaces the current rate."""
    fresh = [dict(group) for group in optimizer.param_groups]
    optimizer.load_state_dict(saved_state)
    for group, flags in zip(optimizer.param_groups, fresh):
        group.update({key: flags[key] for key in OPTIMIZER_SETTINGS})
        if flags["lr"] != saved_lr:
            group["lr"] = flags["lr"]


def rng_state(device, generator):
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state, device, generator):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
