"""Weight averaging for training, kept by torch.optim.swa_utils: an exponential moving average (EMA) of a
network's weights, or their plain mean over the last epochs (stochastic weight averaging, SWA), with its
batch-norm statistics recomputed before it is validated or saved.

The running batch-norm statistics of a network belong to its own weights, not to an average of them
(Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"), so they are measured again on
training batches instead of being averaged along with the weights.
"""
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from ferkit import distributed

# Training batches that re-measure batch-norm statistics: enough for stable means and variances of
# every channel, few enough to cost a small part of an epoch.
BN_BATCHES = 24


def moving_average(model, decay):
    """An EMA copy of `model` (same device and memory format), updated after every optimizer step by
    `update_parameters(model)`: each step moves it 1 - decay of the way towards the current weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def equal_average(model):
    """An SWA copy of `model`: each `update_parameters(model)` adds the current weights to a plain mean of
    all those it was given (Izmailov et al. 2018 add them once per epoch at a constant learning rate)."""
    return AveragedModel(model, use_buffers=False)


@torch.no_grad()
def recompute_batch_norm(averaged, batches, autocast):
    """Replace `averaged`'s batch-norm running statistics by those of `batches` (input tensors, as
    training sees them), under the training precision's `autocast` context."""
    with autocast:
        update_bn(batches, averaged)


def validate_average(averaged, batches, autocast, validate):
    """`validate(network)` of the averaged network, once its batch-norm statistics are re-measured on
    `batches` (and, under torchrun, made the same on every process)."""
    recompute_batch_norm(averaged, batches, autocast)
    distributed.average_buffers(averaged.module)
    return validate(averaged.module)
