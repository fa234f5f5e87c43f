"""Make an attack case from known images, as a client would have produced it.

For tests, benchmarks and users who want to audit their own model without a federation. The
update comes from the clients' own training functions (`fl_sim.training`: a real optimizer
on a real module), not from the attacker's simulation, so a test comparing the two checks
the attacker's modelling of the client.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attacks.case import AttackCase
from fl_sim.training import fedavg_train, fedsgd_gradient


def make_case(model_name: str, num_classes: int, images: torch.Tensor, labels: torch.Tensor, *,
              update_kind: str = "gradient", local_lr: float = 0.0, local_steps: int = 1,
              local_batch_size: int = 0, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
              std: tuple[float, ...] = (0.5, 0.5, 0.5), grey: bool = False, seed: int = 0,
              weights: dict[str, torch.Tensor] | None = None, bn_mode: str = "train",
              send_labels: bool = False) -> AttackCase:
    """The case of a client holding `images` (N, C, H, W) in [0, 1] with `labels`.

    The model gets seeded random weights (or `weights`); the client trains as every client
    does (`fl_sim.training`): BatchNorm per `bn_mode`, cross-entropy with mean reduction,
    FedAvg by plain SGD over minibatches taken in order.
    """
    from fl_sim.models import build_model

    torch.manual_seed(seed)
    model = build_model(model_name, num_classes)
    if weights is not None:
        model.load_state_dict(weights)
    for m in model.modules():  # the attacker cannot know a dropout mask; keep tests exact
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    sent = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = images.shape[1]
    m = torch.tensor(mean).view(1, c, 1, 1)
    s = torch.tensor(std).view(1, c, 1, 1)
    inp = (images - m) / s
    labels = torch.as_tensor(labels, dtype=torch.long)
    if update_kind == "gradient":
        update, _ = fedsgd_gradient(model, inp, labels, bn_mode)
    else:
        start = {k: p.detach().clone() for k, p in model.named_parameters()}
        fedavg_train(model, inp, labels, local_lr, local_steps, local_batch_size, bn_mode)
        update = {k: (p.detach() - start[k]).clone() for k, p in model.named_parameters()}
    return AttackCase(model_name=model_name, num_classes=num_classes, image_shape=tuple(images.shape[1:]),
                      weights=sent, update=update, update_kind=update_kind, num_images=len(images),
                      local_lr=local_lr, local_steps=local_steps, local_batch_size=local_batch_size,
                      mean=mean, std=std, labels=labels.clone() if send_labels else None, grey=grey,
                      bn_mode=bn_mode, meta={"source": "synthetic", "seed": seed})


def face_image(size: int = 32, index: int = 0) -> torch.Tensor:
    """A real colour photograph with a face (scikit-image's astronaut, or its coffee/chelsea
    for index 1/2), centre-cropped to a square and resized: (1, 3, size, size) in [0, 1]."""
    from skimage import data

    arrays = [lambda: data.astronaut()[0:300, 100:400], data.chelsea, data.coffee]
    img = torch.as_tensor(arrays[index % len(arrays)]()).permute(2, 0, 1).float().div(255)
    h, w = img.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top:top + side, left:left + side].unsqueeze(0)
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
