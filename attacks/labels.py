"""Label recovery from the last fully-connected layer of an update.

For cross-entropy, the gradient of the last layer's bias is db_i = mean_n(p_ni - [y_n = i]) and
its weight gradient is dW[i, :] = mean_n((p_ni - [y_n = i]) f_n) with f_n >= 0 after a ReLU or a
sigmoid. So for one image the true class is the only row with negative entries (iDLG's sign
rule), and in a batch the classes present are those with negative bias gradient, each pulled
down by about count_i / N.

For a FedAvg weight difference w_k - w_t ~ -lr * sum of gradients: use the negated difference.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Rule = Literal["auto", "sign", "negative-bias", "count"]


def last_layer_names(model: nn.Module) -> tuple[str, str | None]:
    """Parameter names of the classifier's weight and bias (bias None when absent)."""
    from fl_sim.models import last_linear

    fc = last_linear(model)
    for name, module in model.named_modules():
        if module is fc:
            prefix = f"{name}." if name else ""
            return prefix + "weight", (prefix + "bias" if fc.bias is not None else None)
    raise ValueError("classifier layer not found among the model's modules")  # pragma: no cover


def last_layer_gradient(update: dict[str, torch.Tensor], kind: str, weight_name: str,
                        bias_name: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dW, db) oriented as a gradient: the weight difference is negated."""
    if weight_name not in update:
        raise ValueError(f"the update has no entry for the classifier weight {weight_name!r}")
    sign = -1.0 if kind == "weight-diff" else 1.0
    dW = sign * update[weight_name].detach().float()
    db = sign * update[bias_name].detach().float() if bias_name and bias_name in update else None
    return dW, db


def sign_rule(dW: torch.Tensor) -> int:
    """One image: the class whose weight-gradient row holds the most negative entry."""
    return int(dW.min(dim=1).values.argmin())


def negative_bias_rule(dW: torch.Tensor, db: torch.Tensor | None, n: int) -> torch.Tensor:
    """A batch of n distinct labels: the n classes with the most negative bias gradient
    (without a bias: the n rows with the most negative weight entry)."""
    score = db if db is not None else dW.min(dim=1).values
    n = min(n, score.numel())
    return torch.sort(torch.topk(-score, n).indices).values


def count_rule(dW: torch.Tensor, db: torch.Tensor | None, n: int) -> torch.Tensor:
    """A batch of n labels that may repeat (bias-aware count).

    db_i = pbar_i - c_i / n. Classes absent from the batch have db_i = pbar_i > 0; we estimate
    the softmax mass pbar of a present class by the mean of the positive entries and set
    c_i = n (pbar - db_i), rounded by largest remainder so the counts sum to n, every class
    with negative db getting at least one.
    """
    if db is None:
        # Without a bias there is no count to read; a row with a negative entry is a present
        # class, and the remaining slots go to the most negative rows again.
        db = dW.min(dim=1).values
    db = db.double()
    present = torch.nonzero(db < 0).flatten()
    if len(present) == 0:
        present = db.argmin().reshape(1)
    if len(present) >= n:
        return negative_bias_rule(dW, db.float(), n)
    positive = db[db > 0]
    pbar = positive.mean() if len(positive) else torch.tensor(1.0 / db.numel(), dtype=db.dtype)
    est = (n * (pbar - db[present])).clamp_min(1.0)
    counts = torch.ones(len(present), dtype=torch.long)
    # Hand out the remaining n - len(present) slots to the largest outstanding estimates.
    for _ in range(n - len(present)):
        counts[int((est - counts).argmax())] += 1
    labels = torch.repeat_interleave(present, counts)
    return torch.sort(labels).values


def recover_labels(update: dict[str, torch.Tensor], kind: str, model: nn.Module, num_images: int,
                   rule: Rule = "auto") -> torch.Tensor:
    """Labels (sorted, length num_images) from the classifier's update.

    auto: the sign rule for one image, the count-aware rule for a batch (it falls back to the
    plain negative-bias rule whenever at least num_images classes have a negative bias).
    """
    weight_name, bias_name = last_layer_names(model)
    dW, db = last_layer_gradient(update, kind, weight_name, bias_name)
    if rule == "auto":
        rule = "sign" if num_images == 1 else "count"
    if rule == "sign":
        if num_images != 1:
            raise ValueError("the sign rule recovers one label; use 'negative-bias' or 'count' for batches")
        return torch.tensor([sign_rule(dW)], dtype=torch.long)
    if rule == "negative-bias":
        return negative_bias_rule(dW, db, num_images)
    if rule == "count":
        return count_rule(dW, db, num_images)
    raise ValueError(f"unknown label rule {rule!r}; choose auto, sign, negative-bias or count")


def case_labels(case, model: nn.Module | None = None, rule: Rule = "auto") -> tuple[torch.Tensor, bool]:
    """The labels an attack uses on a case and whether they were recovered (not given)."""
    if case.labels is not None:
        return case.labels.clone(), False
    model = model if model is not None else case.build_model()
    return recover_labels(case.update, case.update_kind, model, case.num_images, rule), True
