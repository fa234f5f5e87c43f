"""The optimisation baselines as presets of the engine.

Defaults follow the papers (and DFLeak's comparison, which runs every baseline for 5000
iterations); where a paper and its released code disagree the other value is a setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from attacks.engine import GradientInversion, InversionConfig, Objective, Schedule
from attacks.registry import register_attack


@dataclass
class IDLGAdamConfig(InversionConfig):
    """iDLG (Zhao et al. 2020) with Adam: L2 gradient matching, no prior, labels from the
    last layer's sign rule. The original optimises with L-BFGS and unboxed pixels."""

    objective: Objective = "l2"
    lr: float = 0.1
    signed: bool = False
    box: bool = False
    schedule: Schedule = "none"
    init: Literal["randn", "rand", "constant", "tensor"] = "randn"


@register_attack("idlg-adam")
class IDLGAdam(GradientInversion):
    Config = IDLGAdamConfig


@dataclass
class InvertGConfig(InversionConfig):
    """Inverting Gradients (Geiping et al. 2020): 1 - cosine over all layers + TV, Adam lr 0.1
    on the signed gradient, pixels boxed, step decay x0.1 at 3/8, 5/8, 7/8.

    TV weight: 0.01 as in DFLeak's paper; its released config uses 0.2.
    """

    objective: Objective = "cosine"
    tv: float = 0.01
    lr: float = 0.1
    signed: bool = True
    box: bool = True
    schedule: Schedule = "step"


@register_attack("invertg")
class InvertG(GradientInversion):
    Config = InvertGConfig


@dataclass
class GradInvConfig(InversionConfig):
    """GradInversion / See-through-gradients (Yin et al. 2021) without its group consistency:
    L2 gradient matching (scaled 1e-4) + TV 1e-4 + L2 norm 1e-6, Adam lr 0.1 (unsigned),
    boxed, cosine decay. The BatchNorm-statistics prior of the paper is a setting
    (`bn_stats`, 0 by default) because DFLeak's comparison leaves it out."""

    objective: Objective = "l2"
    objective_scale: float = 1e-4
    tv: float = 1e-4
    l2: float = 1e-6
    bn_stats: float = 0.0
    lr: float = 0.1
    signed: bool = False
    box: bool = True
    schedule: Schedule = "cosine"


@register_attack("gradinv")
class GradInv(GradientInversion):
    Config = GradInvConfig
