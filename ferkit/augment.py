"""Training augmentation applied to a whole batch at once, on the batch's device.

Every geometric change (flips, rotation, random resized crop) is folded into one affine matrix per
image and applied with a single `grid_sample`, so a batch costs a few tensor operations instead of
hundreds of PIL calls. All randomness comes from the `generator` passed in: same seed, same batch,
same result.
"""
import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ferkit import cli

# The measured defaults (see README, "Accuracy"); add_flags makes each a train.py flag.
DEFAULTS = dict(hflip=0.5, vflip=0.0, rotation=10.0, crop_scale=0.8, brightness=0.2, contrast=0.2,
                erasing=0.25)


def add_flags(p):
    """train.py's augmentation flags on the parser `p`, defaulting to DEFAULTS."""
    p.add_argument("--hflip", type=cli.probability, default=DEFAULTS["hflip"],
                   help="horizontal flip probability")
    p.add_argument("--vflip", type=cli.probability, default=DEFAULTS["vflip"],
                   help="vertical flip probability (faces are never upside down)")
    p.add_argument("--rotation", type=float, default=DEFAULTS["rotation"], help="maximum rotation, degrees")
    p.add_argument("--crop-scale", type=cli.probability, default=DEFAULTS["crop_scale"],
                   help="smallest area fraction of the random resized crop (1 = off)")
    p.add_argument("--brightness", type=cli.probability, default=DEFAULTS["brightness"],
                   help="maximum relative brightness change")
    p.add_argument("--contrast", type=cli.probability, default=DEFAULTS["contrast"],
                   help="maximum relative contrast change")
    p.add_argument("--erasing", type=cli.probability, default=DEFAULTS["erasing"],
                   help="random erasing probability")
    p.add_argument("--mixup", type=cli.non_negative, default=0.0,
                   help="MixUp's Beta(alpha, alpha) parameter on whole batches (0 = off)")
    p.add_argument("--cutmix", type=cli.non_negative, default=0.0,
                   help="CutMix's Beta(alpha, alpha) parameter on whole batches (0 = off; with --mixup, one of the "
                        "two per batch)")
    p.add_argument("--mix-prob", type=cli.probability, default=1.0,
                   help="share of batches that --mixup/--cutmix mix")


def settings(args):
    """augment_batch's keyword arguments from parsed flags (or a run's saved config)."""
    return {key: getattr(args, key) for key in DEFAULTS}


def uniform(low, high, size, generator, device):
    return low + (high - low) * torch.rand(size, generator=generator, device=device)


def random_affine(batch, generator, hflip, vflip, rotation, crop_scale):
    """[B, 2, 3] matrices mapping output to input coordinates in [-1, 1]."""
    device = generator.device
    area = uniform(crop_scale, 1.0, batch, generator, device)
    max_log_ratio = math.log(4 / 3) if crop_scale < 1 else 0.0  # no crop: keep the aspect ratio too
    log_ratio = uniform(-max_log_ratio, max_log_ratio, batch, generator, device)
    width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    center_x = uniform(-1.0, 1.0, batch, generator, device) * (1 - width)
    center_y = uniform(-1.0, 1.0, batch, generator, device) * (1 - height)
    angle = torch.deg2rad(uniform(-rotation, rotation, batch, generator, device))
    flip_x = torch.where(torch.rand(batch, generator=generator, device=device) < hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(batch, generator=generator, device=device) < vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([
        torch.stack([width * cos * flip_x, -height * sin * flip_y, center_x], dim=1),
        torch.stack([width * sin * flip_x, height * cos * flip_y, center_y], dim=1),
    ], dim=1)


def random_erasing(images, generator, probability, area=(0.02, 0.25), log_ratio=(-1.2, 1.2)):
    """Replace one random rectangle per chosen image with noise (Zhong et al. 2017)."""
    batch, _, rows, cols = images.shape
    device = images.device
    chosen = torch.rand(batch, generator=generator, device=device) < probability
    erase_area = uniform(*area, batch, generator, device)
    ratio = uniform(*log_ratio, batch, generator, device).exp()
    height = (torch.sqrt(erase_area * ratio) * rows).clamp(1, rows)
    width = (torch.sqrt(erase_area / ratio) * cols).clamp(1, cols)
    top = torch.rand(batch, generator=generator, device=device) * (rows - height)
    left = torch.rand(batch, generator=generator, device=device) * (cols - width)
    ys = torch.arange(rows, device=device).view(1, rows, 1)
    xs = torch.arange(cols, device=device).view(1, 1, cols)
    inside = ((ys >= top.view(-1, 1, 1)) & (ys < (top + height).view(-1, 1, 1))
              & (xs >= left.view(-1, 1, 1)) & (xs < (left + width).view(-1, 1, 1)) & chosen.view(-1, 1, 1))
    noise = torch.rand(images.shape, generator=generator, device=device, dtype=images.dtype)
    return torch.where(inside.unsqueeze(1), noise, images)


def augment_batch(images, generator, hflip=DEFAULTS["hflip"], vflip=DEFAULTS["vflip"],
                  rotation=DEFAULTS["rotation"], crop_scale=DEFAULTS["crop_scale"],
                  brightness=DEFAULTS["brightness"], contrast=DEFAULTS["contrast"],
                  erasing=DEFAULTS["erasing"]):
    """Augment float images [B, 1, H, W] in [0, 1]; returns a new tensor of the same shape and range.

    hflip, vflip, erasing: probabilities per image. rotation: maximum degrees either way.
    crop_scale: smallest area fraction kept by the random resized crop (1 = no crop).
    brightness, contrast: maximum relative change either way (0 = off).
    """
    batch = images.shape[0]
    if hflip or vflip or rotation or crop_scale < 1:
        theta = random_affine(batch, generator, hflip, vflip, rotation, crop_scale)
        grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if brightness or contrast:
        shape = (batch, 1, 1, 1)
        gain = uniform(1 - brightness, 1 + brightness, shape, generator, images.device)
        spread = uniform(1 - contrast, 1 + contrast, shape, generator, images.device)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * spread + mean) * gain
        images = images.clamp(0, 1)
    if erasing:
        images = random_erasing(images, generator, erasing)
    return images


def batch_mixer(mixup, cutmix, probability, num_classes):
    """MixUp (Zhang et al. 2018, blending two images) and CutMix (Yun et al. 2019, pasting a patch of one
    into another) from torchvision, on whole batches of images and integer labels: a callable returning
    (images, soft labels), applied to a `probability` share of batches; with both on, one of the two per
    batch. None when both alphas are 0. The draws come from torch's global generator, which train.py
    seeds and saves in every checkpoint."""
    mixers = [mixer(alpha=alpha, num_classes=num_classes)
              for mixer, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha > 0]
    if not mixers:
        return None
    mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
    return mix if probability >= 1 else v2.RandomApply([mix], p=probability)
