"""Data-parallel training across processes (GPUs, machines) for train.py: joining the process group,
which process this is, sharding, and the few collectives training needs. Outside a launch (plain
`python train.py`) there is no process group and every function here is a no-op or returns the
single-process answer, so train.py has one code path.

    torchrun --standalone --nproc_per_node=2 train.py ...                      # one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT train.py ...

The recipe does not depend on the process count: --batch-size is the global batch, each epoch's order
comes from (seed, epoch), and each global batch is cut into one contiguous part per process.
"""
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from ferkit.cli import UsageError
from ferkit.device import pick_device


def launched():
    """Whether this process is one of a launch (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, ...)."""
    return "WORLD_SIZE" in os.environ


def world_size():
    """The number of processes: from the environment, so it is known before the process group exists."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_master():
    """Rank 0 alone prints and writes files (checkpoints, metrics, plots, config.json)."""
    return rank() == 0


def check_launch(batch_size, sync_bn, device, train_images=None):
    """Refuse, before any work, settings the processes cannot share: every process takes
    batch_size / processes images of each batch, and at least two of the last, partial one (batch
    norm needs two); --sync-bn needs GPUs."""
    world = world_size()
    if batch_size % world:
        multiple = -(-batch_size // world) * world
        raise UsageError(f"--batch-size {batch_size} does not divide among {world} processes: it is the global "
                         f"batch, of which each process takes batch_size / {world}. Pass a multiple of {world}, "
                         f"such as --batch-size {multiple}.")
    last = train_images % batch_size if train_images else 0
    if world > 1 and 0 < last < 2 * world:
        raise UsageError(f"the last batch of each epoch holds {last} of the {train_images} training images, too few "
                         f"to give each of the {world} processes two (batch norm needs two). Pass a --batch-size "
                         f"that leaves 0 or at least {2 * world} images over.")
    if sync_bn and world > 1 and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA GPUs: torch's SyncBatchNorm does not run on CPU. Train on CPU "
                         "without it (each process then normalizes over its own part of every batch).")


def device_for(choice):
    """This process's device for --device `choice`: under a launch, a GPU is cuda:LOCAL_RANK (choose
    the GPUs with CUDA_VISIBLE_DEVICES); otherwise what device.pick_device says."""
    device = pick_device(choice)
    if not launched():
        return device
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type != "cpu":
        if choice != "auto":
            raise UsageError(f"several processes train on CUDA GPUs (NCCL) or on CPU (gloo), not on "
                             f"{device.type}: pass --device cuda or --device cpu")
        device = torch.device("cpu")
    return device


def threads_per_process(threads):
    """`threads` (every core, by default) shared among the processes on this machine."""
    return max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(device, timeout_s):
    """Join the launch's process group (nothing outside a launch): NCCL for CUDA tensors, gloo for
    CPU ones. A collective that waits longer than `timeout_s` (a process killed or hung) fails, so
    the others exit with an error instead of hanging."""
    if not launched() or dist.is_initialized():
        return
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # abort on an NCCL timeout, not hang
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    endpoint = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "address already in use" in str(error).lower():
            hint = (f"port {os.environ.get('MASTER_PORT')} is in use (another run?): choose a free port in "
                    "--rdzv-endpoint HOST:PORT (or MASTER_PORT), or use --standalone on one machine")
        else:
            hint = (f"no rendezvous with the other processes at {endpoint} within {timeout_s:g} s: start every "
                    "node with the same --rdzv-endpoint HOST:PORT, reachable from all of them, and the same "
                    "--nnodes; raise --dist-timeout if nodes start far apart")
        raise UsageError(f"cannot join the process group as rank {os.environ.get('RANK', '?')} of {world_size()}: "
                         f"{hint} ({detail})") from error


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items):
    """This process's contiguous part of `items` (a global batch's indices, the validation images):
    the parts of all processes, in rank order, are `items`; their sizes differ by at most one."""
    if not dist.is_initialized():
        return items
    return items.tensor_split(dist.get_world_size())[dist.get_rank()]


def all_reduce_sum(tensor):
    """`tensor` summed over every process, in place (on the tensor's device: NCCL or gloo)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def average_buffers(model):
    """Average batch norm's running statistics over the processes (each saw its own part of every
    batch), so the model validated and saved is one model. With --sync-bn they are equal already."""
    if not dist.is_initialized():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())


def gather(value):
    """[value of rank 0, value of rank 1, ...] on every process; [value] outside a launch."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def on_master(function, *args):
    """`function(*args)` run on rank 0 alone, its result (or the UsageError it raised) handed to every
    process: for what only rank 0 should read or print (the run folder may be on rank 0's disk only)."""
    result = error = None
    if is_master():
        try:
            result = function(*args)
        except UsageError as raised:
            error = raised
    if dist.is_initialized():
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def derived_seed(*parts):
    """A 63-bit seed fixed by `parts`: the same parts, the same seed."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def rank_seed(seed, process):
    """The seed of process `process`'s random numbers (augmentation, dropout): the run's own seed on
    rank 0, so one process draws exactly what plain `python train.py` draws; one derived from (seed,
    rank) on the others, so each rank augments differently and the same seed and process count
    reproduce the run."""
    return seed if process == 0 else derived_seed(seed, process)


def wrap(model, device, sync_bn):
    """(the model to train, the plain model): under a launch the first is `model` in
    DistributedDataParallel (with batch norm synchronized across processes on --sync-bn), whose
    gradients are averaged over the processes; the plain one is what is validated and saved."""
    if not dist.is_initialized():
        return model, model
    if sync_bn and dist.get_world_size() > 1:  # check_launch refused it on CPU
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids), model
