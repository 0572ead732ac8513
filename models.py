"""The CNN architectures and their registry.

Every network takes a batch of 1x48x48 grayscale faces scaled to [0, 1] and returns class logits.
No input normalisation is needed: each starts with a convolution followed by batch norm.
Adding an architecture is one function, `@register(epochs=N)` (and `lr=` where it trains best at another
learning rate), that builds it for a number of classes:
train.py's --models, `python models.py` and checkpoint loading then know it by the function's name.
"""
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Every architecture by name, in registration order: (function(num_classes) -> network, its defaults of
# train.py's --epochs and --lr).
MODELS = {}


def register(epochs, lr=0.03):
    """A decorator adding its function to MODELS under the function's name, trained for `epochs` epochs
    from the learning rate `lr` unless --epochs and --lr say otherwise."""
    def add(build):
        MODELS[build.__name__] = (build, {"epochs": epochs, "lr": lr})
        return build
    return add


def conv_bn(in_channels, out_channels, kernel_size=3):
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels)]


def conv_bn_relu(in_channels, out_channels, kernel_size=3):
    return conv_bn(in_channels, out_channels, kernel_size) + [nn.ReLU(inplace=True)]


def conv_block(in_channels, out_channels, convs, dropout):
    """`convs` conv-BN-ReLU layers, closed by 2x2 max-pooling and dropout."""
    layers = conv_bn_relu(in_channels, out_channels)
    for _ in range(convs - 1):
        layers += conv_bn_relu(out_channels, out_channels)
    return layers + [nn.MaxPool2d(2), nn.Dropout(dropout)]


@register(epochs=60)
def model_x(num_classes, width=32, dropout=0.1):
    """VGG-style: four blocks of two 3x3 convs (48->24->12->6->3), then a two-layer head.

    The blocks' dropout is light because, on top of the augmentation and the head's dropout, a heavier one
    left model_x underfitting its training data within its epochs (docs/results.md, ablations)."""
    widths = [width, width * 2, width * 4, width * 8]
    layers, in_channels = [], 1
    for out_channels in widths:
        layers += conv_block(in_channels, out_channels, convs=2, dropout=dropout)
        in_channels = out_channels
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(in_channels * 3 * 3, 256, bias=False),
        nn.BatchNorm1d(256),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(256, num_classes),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers added to a shortcut (1x1-projected where the width changes), then ReLU:
    a ResNet basic block."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(in_channels, out_channels), *conv_bn(out_channels, out_channels))
        self.shortcut = (nn.Sequential(*conv_bn(in_channels, out_channels, kernel_size=1))
                         if in_channels != out_channels else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


def residual_network(num_classes, width, dropout, blocks):
    """A 5x5 stem and max-pooling (48->24), then three stages of residual blocks, `blocks[i]` in stage i,
    at widths 2, 4 and 8 times `width` (24->12->6 with max-pooling between), global average pooling, dropout
    and a linear classifier."""
    layers, in_channels = [*conv_bn_relu(1, width, kernel_size=5), nn.MaxPool2d(2)], width
    for stage, count in enumerate(blocks):
        out_channels = width * 2 ** (stage + 1)
        layers += [nn.MaxPool2d(2)] if stage else []
        for _ in range(count):
            layers.append(ResidualBlock(in_channels, out_channels))
            in_channels = out_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(in_channels, num_classes))


# model_y's epochs are cheaper than model_x's, so it gets more of them within the same time budget
# (both models in 90 minutes on two CPU cores).
@register(epochs=72)
def model_y(num_classes, width=32, dropout=0.3):
    """A 5x5 stem, then three residual blocks (48->24->12->6) and global average pooling: seven conv
    layers on the main path (depth counted as ResNet counts it) against model_x's eight.

    Shortcuts instead of stacked blocks, a wider first kernel and a pooled head instead of a dense
    spatial one are there to make its mistakes differ from model_x's: an ensemble gains only where its
    members disagree.
    """
    return residual_network(num_classes, width, dropout, blocks=(1, 1, 1))


@register(epochs=80)
def model_z(num_classes, width=32, dropout=0.3):
    """model_y made deeper where the feature maps are small: a second residual block at 12x12 and at
    6x6 (eleven conv layers on the main path), for more capacity at little cost per layer. A third shape
    for the ensemble, deeper than both others; the longest-trained member of the 3-hour budget, whose
    ensemble gained more from its 80 epochs than from 40 (docs/results.md, ablations)."""
    return residual_network(num_classes, width, dropout, blocks=(1, 2, 2))


# ---------------------------------------------------------------------------------------------------
# model_a: shaped for training speed (issue #39), after airbench (Keller Jordan, github.com/KellerJordan/airbench)
# ---------------------------------------------------------------------------------------------------

WHITENING_PATCH = 3  # the whitening layer's patch side: 9 pixels, so 18 filters (each eigenvector and its negative)
WHITENING_IMAGES = 5000  # training images whose patches estimate the covariance
WHITENING_EPS = 5e-4  # added to the eigenvalues, relative to their mean, so the noise directions stay bounded
LOGIT_SCALE = 1 / 9  # airbench's: without it the max-pooled features' logits grow until training stalls


class Scale(nn.Module):
    """Multiplies its input by a fixed factor."""
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def conv_group(in_channels, out_channels):
    """A 3x3 conv at the input's size, 2x2 max-pooling, then a second 3x3 conv at a quarter of the pixels,
    each followed by batch norm and GELU: the costly conv runs where the maps are already small."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
                         nn.BatchNorm2d(out_channels), nn.GELU(),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.GELU())


@register(epochs=22, lr=0.1)
def model_a(num_classes, widths=(32, 128, 256), dropout=0.0):
    """A frozen patch-whitening 3x3 conv (set from training patches by fit_whitening), then three conv
    groups (48->24->12->6), global max-pooling and a linear classifier. The convs start as identities
    (dirac) on the channels they share with their input, so the network starts close to its whitened input."""
    whiten = nn.Conv2d(1, 2 * WHITENING_PATCH ** 2, WHITENING_PATCH, padding=WHITENING_PATCH // 2)
    whiten.weight.requires_grad_(False)
    layers, in_channels = [("whiten", whiten), ("whiten_act", nn.GELU())], whiten.out_channels
    for index, out_channels in enumerate(widths):
        layers.append((f"group{index + 1}", conv_group(in_channels, out_channels)))
        in_channels = out_channels
    network = nn.Sequential(OrderedDict(layers + [
        ("pool", nn.AdaptiveMaxPool2d(1)), ("flatten", nn.Flatten()), ("dropout", nn.Dropout(dropout)),
        ("classifier", nn.Linear(in_channels, num_classes, bias=False)), ("scale", Scale(LOGIT_SCALE))]))
    for module in network.modules():
        if isinstance(module, nn.Conv2d) and module is not whiten:
            nn.init.dirac_(module.weight[:module.in_channels])
    return network


def image_patches(images, side):
    """Every side x side patch of float images [N, 1, H, W], flattened: [patches, side * side]."""
    return images.unfold(2, side, 1).unfold(3, side, 1).reshape(-1, side * side)


@torch.no_grad()
def fit_whitening(model, images):
    """Set a model's whitening conv (if it has one) from uint8 training images [N, 1, H, W]: each filter an
    eigenvector of the patches' (uncentred) covariance scaled by the inverse square root of its eigenvalue,
    and its negative, so the layer's outputs are decorrelated with unit variance (airbench's first layer)."""
    whiten = getattr(model, "whiten", None)
    if whiten is None:
        return
    patches = image_patches(images[:WHITENING_IMAGES].float().div(255), whiten.kernel_size[0]).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = eigenvectors.T / torch.sqrt(eigenvalues + WHITENING_EPS * eigenvalues.mean()).unsqueeze(1)
    filters = filters.reshape(-1, 1, *whiten.kernel_size)
    whiten.weight.copy_(torch.cat([filters, -filters]).to(whiten.weight))
    whiten.bias.zero_()


def check_known(name):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")


def build_model(name, num_classes):
    check_known(name)
    return MODELS[name][0](num_classes)


def training_defaults(name):
    """{"epochs": ..., "lr": ...}: what `name` trains with when --epochs and --lr are not given."""
    check_known(name)
    return dict(MODELS[name][1])


def describe_model(model, side=48):
    """Parameter count and multiply-adds for one 1 x side x side image, measured by torch's FLOP counter
    (a RuntimeError where the network cannot take that size)."""
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    with counter, torch.no_grad():
        try:
            model(torch.zeros(1, 1, side, side, device=device))
        finally:
            model.train(was_training)
    return {"parameters": params, "macs": counter.get_total_flops() // 2}


def size_table(num_classes=7):
    """A markdown table of every registered model's parameters, multiply-adds per image, default epochs and
    learning rate."""
    lines = ["| model | parameters | multiply-adds per 48x48 image | default epochs | default lr |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in MODELS:
        size, defaults = describe_model(build_model(name, num_classes)), training_defaults(name)
        lines.append(f"| {name} | {size['parameters'] / 1e6:.2f} M | {size['macs'] / 1e6:.0f} M | "
                     f"{defaults['epochs']} | {defaults['lr']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(size_table())
