"""Loading a training checkpoint safely, and continuing an interrupted run: whether the run folder's checkpoint fits, the settings the
run continues with (the saved ones, overridden by the flags given now, with every command that trained
it), and putting the optimizer, scheduler and random-number generators back where they were."""
import argparse
import copy
import subprocess
from pathlib import Path

import torch

from ferkit.cli import UsageError
from ferkit.distributed import derived_seed
from models import build_model


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict safely: `weights_only=True` refuses anything that would run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # unpickling errors come in many types; all mean the same here
        raise ValueError(f"cannot load checkpoint {path}: {error}") from error


def model_from_checkpoint(checkpoint, device="cpu"):
    """Rebuild the network a checkpoint was trained with and load its weights, in eval mode."""
    model = build_model(checkpoint["model_name"], len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def open_run(name, args, classes, run_dir):
    """The saved state to continue from (None for a fresh run), after checking it fits."""
    last = run_dir / "last.pt"
    if not args.resume:
        if last.exists() and not args.overwrite:
            raise UsageError(f"{run_dir} already holds a run. Pass --resume to continue it, --overwrite to "
                             "replace it, or --out to train elsewhere.")
        return None
    if not last.exists():
        raise UsageError(f"--resume: no {last}. Start the run without --resume.")
    try:
        checkpoint = load_checkpoint(last)
    except ValueError as error:
        raise UsageError(f"--resume: {error}") from error
    if checkpoint.get("model_name") != name or checkpoint.get("classes") != classes:
        raise UsageError(f"--resume: {last} is a {checkpoint.get('model_name')} run on classes "
                         f"{checkpoint.get('classes')}, not {name} on {classes}. Use another --out.")
    return checkpoint


def saved_data_source(last):
    """The --data of the run being resumed, so `--resume` alone continues on the same data."""
    try:
        return load_checkpoint(last)["config"]["data"]
    except (FileNotFoundError, ValueError, KeyError):
        return None  # open_run explains what is wrong with the checkpoint


def given_flags(parser, argv=None):
    """The names (dests) of the flags given in `argv`, whatever their values. A value equal to the
    default says nothing about whether it was typed, so a copy of the parser in which no flag has a
    default parses `argv` again: only the given flags appear in what it returns."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def resumed_config(args, given, checkpoint):
    """The run's saved settings, overridden by the flags given on this command line (`given`, from
    given_flags), even where a given value equals the default; a flag the run predates takes its value now,
    and a saved setting train.py no longer has is dropped."""
    saved = checkpoint["config"]
    config = {key: value if key in given or key not in saved else saved[key] for key, value in vars(args).items()}
    # One scheduler's state means nothing to another.
    if config["schedule"] != saved.get("schedule", config["schedule"]):
        raise UsageError(f"--resume: this run was trained with --schedule {saved['schedule']}; it cannot switch to "
                         f"{config['schedule']}. Resume without that flag, or start a new run with --out.")
    return argparse.Namespace(**config)


def code_version():
    """The commit the code came from (with -dirty for uncommitted changes), or None outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def with_provenance(args, checkpoint, invocation):
    """`args` with every command that has trained this run so far and the code's commit: export.py
    records them beside the shipped weights."""
    earlier = checkpoint["config"].get("commands", []) if checkpoint else []
    return argparse.Namespace(**{**vars(args), "commands": [*earlier, invocation], "commit": code_version()})


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
        group.update({key: flags[key] for key in OPTIMIZER_SETTINGS if key in flags})
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


def restore_rank_rng(checkpoint, rank, seed, device, generator):
    """Put process `rank`'s generators back where the saved run left them. A checkpoint holds every
    rank's generator states ("rng": rank 0's, as a single-process run saves them; "rank_rng": ranks 1,
    2, ...), so a resume with the same process count continues every stream and repeats the
    uninterrupted run. With fewer processes the extra ranks' streams are dropped; with more, a rank the
    saved run did not have starts a stream seeded from (seed, rank, epoch, batch): reproducible for a
    given seed, process count and stopping point."""
    states = [checkpoint["rng"], *checkpoint.get("rank_rng", [])]
    if rank < len(states):
        restore_rng(states[rank], device, generator)
    else:
        fresh = derived_seed(seed, rank, checkpoint["progress"]["epoch"], checkpoint["progress"]["batch"])
        torch.manual_seed(fresh)
        generator.manual_seed(fresh)
