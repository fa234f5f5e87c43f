"""ATS: the augmentation policies of Gao et al. (CVPR 2021, "Privacy-preserving
collaborative learning with automatic transformation search"), the operations behind the
client-side defense `ats` (fl_sim/defenses.py).

A client trains on transformed images, so a gradient inversion recovers (at best) the
transformed image. ATS searched chains of AutoAugment operations for those that hurt
reconstruction most and accuracy least; a policy is written as indices into a list of 50
(operation, magnitude) candidates, chains joined by "-", alternative chains by "+" (each
image takes one chain at random). The paper's searched hybrid for CIFAR-100 / ResNet20 is
"3-1-7+43-18-18" (the preset); "3-1-7" and "43-18-18" are its two halves.

Faithful to the authors' code where it departs from AutoAugment: each operation of a chain
is always applied (its listed probability is ignored), and the magnitude ranges are theirs
(contrast, sharpness, brightness and colour within 1 +- 0.5, translation up to 150/331 of
the size). Before the chain their training takes a random crop (padding 1/8 of the size)
and a horizontal flip (`crop_flip`). Implemented on tensors with torchvision's functional
transforms, with randomness from the client's seeded generator, so a client's transformed
batch is reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as F


# Magnitude of an operation at level i (0..9): the authors' ranges.
_LEVELS = 10


def _level(low: float, high: float) -> Callable[[int], float]:
    return lambda i: low + (high - low) * i / (_LEVELS - 1)


MAGNITUDE: dict[str, Callable[[int], float]] = {
    "shearX": _level(0, 0.3), "shearY": _level(0, 0.3),
    "translateX": _level(0, 150 / 331), "translateY": _level(0, 150 / 331),
    "rotate": _level(0, 30), "color": _level(0, 0.5), "posterize": lambda i: round(8 - 4 * i / 9),
    "solarize": _level(256, 0), "contrast": _level(0, 0.5), "sharpness": _level(0, 0.5),
    "brightness": _level(0, 0.5), "autocontrast": lambda i: 0.0, "equalize": lambda i: 0.0,
    "invert": lambda i: 0.0,
}

# The 50 candidate operations, by index: (operation, magnitude level). The published list.
CANDIDATES: list[tuple[str, int]] = [
    ("invert", 7), ("contrast", 6), ("rotate", 2), ("translateX", 9), ("sharpness", 1),
    ("sharpness", 3), ("shearY", 2), ("translateY", 2), ("autocontrast", 5), ("equalize", 2),
    ("shearY", 5), ("posterize", 5), ("color", 3), ("brightness", 5), ("sharpness", 9),
    ("brightness", 9), ("equalize", 5), ("equalize", 1), ("contrast", 7), ("sharpness", 5),
    ("color", 5), ("translateX", 5), ("equalize", 7), ("autocontrast", 8), ("translateY", 3),
    ("sharpness", 6), ("brightness", 6), ("color", 8), ("solarize", 0), ("invert", 0),
    ("equalize", 0), ("autocontrast", 0), ("equalize", 8), ("equalize", 4), ("color", 5),
    ("equalize", 5), ("autocontrast", 4), ("solarize", 4), ("brightness", 3), ("color", 0),
    ("solarize", 1), ("autocontrast", 0), ("translateY", 3), ("translateY", 3), ("autocontrast", 1),
    ("solarize", 1), ("equalize", 5), ("invert", 0), ("translateY", 3), ("autocontrast", 1),
]

HYBRID = "3-1-7+43-18-18"  # the paper's searched policy (CIFAR-100, ResNet20)


def parse_policy(policy: str) -> list[list[int]]:
    """"3-1-7+43-18-18" -> [[3, 1, 7], [43, 18, 18]]; a clear error for anything else."""
    try:
        chains = [[int(i) for i in chain.split("-")] for chain in policy.split("+")]
    except ValueError:
        raise ValueError(f"policy {policy!r}: chains of candidate indices joined by '-', alternatives by '+' "
                         f"(e.g. {HYBRID!r})") from None
    bad = [i for chain in chains for i in chain if not 0 <= i < len(CANDIDATES)]
    if bad:
        raise ValueError(f"policy {policy!r}: indices {bad} are not candidates (0..{len(CANDIDATES) - 1})")
    return chains


def _sign(g: torch.Generator) -> float:
    return 1.0 if int(torch.randint(2, (1,), generator=g)) else -1.0


def _uint8(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Operations defined on 8-bit images (equalize, posterize), applied to [0, 1] floats."""
    return lambda x: fn((x * 255).round().clamp(0, 255).to(torch.uint8)).float() / 255


def apply_operation(image: torch.Tensor, name: str, level: int, g: torch.Generator) -> torch.Tensor:
    """One candidate operation on one image (C, H, W) in [0, 1]."""
    m = MAGNITUDE[name](level)
    h, w = image.shape[-2:]
    if name in ("shearX", "shearY"):
        degrees = math.degrees(math.atan(m)) * _sign(g)
        shear = [degrees, 0.0] if name == "shearX" else [0.0, degrees]
        return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                        interpolation=F.InterpolationMode.BILINEAR, fill=0.0)
    if name in ("translateX", "translateY"):
        shift = round(m * (w if name == "translateX" else h) * _sign(g))
        translate = [shift, 0] if name == "translateX" else [0, shift]
        return F.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], fill=0.0)
    if name == "rotate":  # the authors rotate one way only and fill with grey
        return F.rotate(image, m, interpolation=F.InterpolationMode.BILINEAR, fill=0.5)
    enhance = {"color": F.adjust_saturation, "contrast": F.adjust_contrast, "sharpness": F.adjust_sharpness,
               "brightness": F.adjust_brightness}
    if name in enhance:
        return enhance[name](image, 1.0 + m * _sign(g)).clamp(0, 1)
    if name == "posterize":
        return _uint8(lambda x: F.posterize(x, int(m)))(image)
    if name == "solarize":
        return F.solarize(image, m / 255.0) if m < 256 else image
    single = {"autocontrast": F.autocontrast, "equalize": _uint8(F.equalize), "invert": F.invert}
    return single[name](image)


def transform_batch(images: torch.Tensor, policy: str, with_crop_flip: bool, g: torch.Generator) -> torch.Tensor:
    """Each image (N, C, H, W) in [0, 1] through the authors' crop and flip (optional) and one
    chain of the policy chosen at random."""
    chains = parse_policy(policy)
    out = []
    for image in images:
        if with_crop_flip:
            image = crop_flip(image, g)
        for index in chains[int(torch.randint(len(chains), (1,), generator=g))]:
            image = apply_operation(image, *CANDIDATES[index], g)
        out.append(image.clamp(0, 1))
    return torch.stack(out).to(images.dtype)


def crop_flip(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The authors' training pipeline before the policy: a random crop of the image padded by
    1/8 of its size (zeros), then a horizontal flip with probability 1/2."""
    h, w = image.shape[-2:]
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    top, left = (int(torch.randint(2 * pad + 1, (1,), generator=g)) for _ in range(2))
    out = padded[..., top:top + h, left:left + w]
    return out.flip(-1) if int(torch.randint(2, (1,), generator=g)) else out


__all__ = ["CANDIDATES", "HYBRID", "parse_policy", "apply_operation", "crop_flip", "transform_batch"]
