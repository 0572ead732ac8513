"""The learning-rate schedules train.py offers: their flags, the checks that a combination of them can
work, and the torch.optim scheduler they make. A scheduler steps once per epoch."""
import torch

from ferkit import cli


def add_flags(p):
    """train.py's schedule flags on the parser `p`."""
    p.add_argument("--schedule", default="cosine", choices=["plateau", "cosine"],
                   help="how the learning rate falls: cosine (a cosine decay from the initial rate to the floor "
                        "over all epochs) or plateau (cut when validation loss stalls, the original project's "
                        "schedule)")
    p.add_argument("--restarts", type=cli.positive(int), default=1,
                   help="cosine schedule: this many equal cycles, each restarting at --lr (SGDR, Loshchilov & "
                        "Hutter 2017); the weights at each cycle's end are saved as snapshot_<cycle>.pt, members "
                        "for evaluate.py --checkpoints (a snapshot ensemble, Huang et al. 2017)")
    p.add_argument("--plateau-patience", type=int, default=3,
                   help="plateau schedule: epochs without validation-loss improvement before the learning rate is "
                        "cut, or, once it is at --min-lr, before training stops")
    p.add_argument("--plateau-factor", type=cli.probability, default=0.3,
                   help="plateau schedule: learning-rate cut factor")
    p.add_argument("--min-lr", type=float, default=3e-4,
                   help="learning-rate floor; under --schedule plateau, training stops early once the rate is there "
                        "and validation loss has not improved for more than --plateau-patience epochs")
    p.add_argument("--swa-epochs", type=int, default=0,
                   help="stochastic weight averaging (Izmailov et al. 2018) over this many last epochs (0 = off): the "
                        "cosine decays to --swa-lr over the epochs before them, the rate then stays there, and the "
                        "weights after each of these epochs join a plain mean, which is validated and saved as "
                        "best.pt like --ema-decay's average")
    p.add_argument("--swa-lr", type=cli.positive(float), default=0.01,
                   help="with --swa-epochs: the constant learning rate of the averaged epochs")


def check_flags(args):
    """Refuse, before any training, the combinations no scheduler can follow."""
    if args.swa_epochs and (args.schedule != "cosine" or args.restarts > 1 or args.ema_decay):
        raise cli.UsageError("--swa-epochs works with one cosine cycle (--schedule cosine --restarts 1) and without "
                             "--ema-decay: drop --swa-epochs or those flags")
    if not 0 <= args.swa_epochs < args.epochs:
        raise cli.UsageError(f"--swa-epochs {args.swa_epochs}: give 0 (off) or fewer than --epochs {args.epochs}, "
                             "so that the decay to --swa-lr has epochs before it")
    if args.schedule == "cosine" and args.epochs % args.restarts:
        raise cli.UsageError(f"--epochs {args.epochs} is not a multiple of --restarts {args.restarts}")


def build(optimizer, args):
    if args.swa_epochs:  # cosine-shaped down to --swa-lr, then constant: torch's own SWA schedule
        return torch.optim.swa_utils.SWALR(optimizer, swa_lr=args.swa_lr, anneal_epochs=args.epochs - args.swa_epochs,
                                           anneal_strategy="cos")
    if args.schedule == "cosine" and args.restarts > 1:
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=args.epochs // args.restarts, eta_min=args.min_lr)
    if args.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=args.min_lr)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=args.plateau_factor, patience=args.plateau_patience, min_lr=args.min_lr)


def is_averaging(args, epoch):
    """Whether the weights after `epoch` (counted from 0) join the SWA mean."""
    return bool(args.swa_epochs) and epoch >= args.epochs - args.swa_epochs
