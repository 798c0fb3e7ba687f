"""A deep image prior (Ulyanov, Vedaldi & Lempitsky, CVPR 2018) for optimisation attacks.

Instead of optimising pixels, an attack optimises the weights ``ω`` of an *untrained*
convolutional generator ``G_ω`` whose input ``ζ`` is fixed random noise; the candidate batch is
``x̂ = G_ω(ζ)``.  A convolutional network fits natural images (smooth regions, edges) long before
it fits noise, so the parametrisation itself is the image prior.  The feature-reconstruction
attack of Liu, Wang, Chen & Lei ("Data Reconstruction Attacks and Defenses: A Systematic
Evaluation", AISTATS 2025) uses an untrained U-Net this way; the exact depth and widths of theirs
are not published (notes, vision-attacks-and-defenses.md §2.5), so this one is a small, CPU-sized
U-Net: two stride-2 downsamplings, bilinear upsampling with skip connections, conv–norm–LeakyReLU
blocks as in the DIP paper, and a sigmoid output mapped into the task's normalised pixel box.

Everything random (the weights' initialisation and ``ζ``) comes from the ``rng`` passed in; the
global generator is neither read nor reseeded (the modules are built on the meta device and
initialised explicitly).

Threat model: none of its own; it is a parametrisation used by server-side attacks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedleak.core import Task


class UNet(nn.Module):
    """A small U-Net: ``[B, noise, H, W] -> [B, C, H, W]`` pixels in (0, 1).

    ``width`` channels at full resolution, ``2·width`` at 1/2 and 1/4; ``skip`` channels carried
    across each resolution (DIP's default skips are narrow: 4 channels).  Sides that are not
    multiples of 4 work: upsampling goes to the skip's exact size.
    """

    def __init__(self, noise: int, channels: int, width: int = 32, skip: int = 4) -> None:
        super().__init__()
        wide = 2 * width

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                # GroupNorm, not DIP's BatchNorm: the slots of a batch stay independent images.
                nn.GroupNorm(1, cout),
                nn.LeakyReLU(0.2),
            )

        self.enc0 = block(noise, width)  # H
        self.enc1 = block(width, wide, stride=2)  # H/2
        self.enc2 = block(wide, wide, stride=2)  # H/4
        self.mid = block(wide, wide)
        self.skip0 = block(width, skip)
        self.skip1 = block(wide, skip)
        self.dec1 = block(wide + skip, wide)  # H/2
        self.dec0 = block(wide + skip, width)  # H
        self.out = nn.Conv2d(width, channels, 1)

    def forward(self, zeta: Tensor) -> Tensor:
        e0 = self.enc0(zeta)
        e1 = self.enc1(e0)
        d = self.mid(self.enc2(e1))
        d = self.dec1(torch.cat([_up(d, e1), self.skip1(e1)], 1))
        d = self.dec0(torch.cat([_up(d, e0), self.skip0(e0)], 1))
        return torch.sigmoid(self.out(d))


def _up(x: Tensor, like: Tensor) -> Tensor:
    return nn.functional.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def deep_image_prior(
    task: Task,
    size: int,
    rng: torch.Generator,
    *,
    width: int = 32,
    noise: int = 8,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> tuple[list[Tensor], Callable[[], Tensor]]:
    """A fresh U-Net prior for ``size`` images of ``task``: the leaves to optimise and ``G(ζ)``.

    Args:
        task: an image task; ``G`` outputs its ``input_shape`` normalised like its inputs.
        size: images in the batch (one shared network, one noise map ``ζ_i`` per image).
        rng: the only source of randomness: the weights, then ``ζ``.
        width: channels of the network's first block.
        noise: channels of ``ζ``.
        scale: the weights are ``scale · leaf``.  An optimiser that takes steps of a fixed size
            on the leaves (Adam, signed or not) then moves the weights ``scale`` times as far, so
            the caller sets the generator's effective step size without its own optimiser.
        device: where the network, ``ζ`` and the leaves live (drawn on the CPU, then moved).

    Returns:
        ``(leaves, images)``: the parameters to optimise (weights divided by ``scale``), and a
        function returning the current candidate batch ``[size, C, H, W]`` in model-input space,
        inside the valid pixel box by construction.
    """
    if task.modality != "image" or len(task.input_shape) != 3:
        raise ValueError(
            f"deep_image_prior: needs an image task with (C, H, W) inputs, got {task.modality} "
            f"with input shape {task.input_shape}"
        )
    if width < 1 or noise < 1 or not scale > 0:
        raise ValueError(
            f"deep_image_prior: width and noise must be >= 1 and scale > 0, got width={width}, "
            f"noise={noise}, scale={scale}"
        )
    channels, height, side = task.input_shape
    with torch.device("meta"):  # no draw from the global RNG: weights are set from rng below
        net = UNet(noise, channels, width)
    net = net.to_empty(device=device)
    leaves = {}
    for prefix, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            # PyTorch's default for convolutions (Kaiming uniform, a = √5; bias U(±1/√fan_in)),
            # drawn from rng instead of the global generator.
            # Drawn on the CPU, where the generator lives, then moved.
            weight = torch.empty_like(module.weight, device="cpu")
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=rng)
            weight = weight.to(device)
            bound = 1 / math.sqrt(module.weight[0].numel())
            bias = (torch.rand(module.bias.shape, generator=rng).to(device) * 2 - 1) * bound
        elif isinstance(module, nn.GroupNorm):
            weight, bias = torch.ones_like(module.weight), torch.zeros_like(module.bias)
        else:
            continue
        leaves[f"{prefix}.weight"] = (weight / scale).requires_grad_()
        leaves[f"{prefix}.bias"] = (bias / scale).requires_grad_()
    # DIP's input: uniform noise of small amplitude (1/10), fixed during the optimisation.
    zeta = torch.rand((size, noise, height, side), generator=rng).to(device) * 0.1
    mean = torch.tensor(task.mean or (0.0,) * channels, device=device).view(1, -1, 1, 1)
    std = torch.tensor(task.std or (1.0,) * channels, device=device).view(1, -1, 1, 1)

    def images() -> Tensor:
        weights = {name: leaf * scale for name, leaf in leaves.items()}
        pixels = functional_call(net, weights, (zeta,))
        return (pixels - mean) / std

    return list(leaves.values()), images
