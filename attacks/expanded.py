"""Per-victim parameters without vmap: the model evaluated for V victims at once.

A gradient-inversion iteration for V victims needs V separate parameter gradients (one per
victim) and their double backward. torch.func.vmap computes the per-victim convolution weight
gradients as grouped convolutions (groups = V), whose CPU kernels are slow for the small
spatial sizes of the last stages (ResNet18 layer4 at 64 px: 2x2 maps, 512 channels), and
depthwise convolutions (MobileNetV2) fall back to a loop over groups in their double backward.

Here every parametrised layer takes a per-victim weight tensor (V, ...) and is written as
batched matrix products: a convolution is unfold + matmul (a depthwise one a broadcast
multiply-sum), a linear layer a bmm, BatchNorm normalises each victim's batch on its own
statistics and applies that victim's affine parameters. The gradient of the summed loss with
respect to the (V, ...) weights is then each victim's own gradient, computed by batched
GEMMs, and the double backward is again batched GEMMs (fold, bmm). The model's own forward
(residual adds, pooling, flatten) runs unchanged on the (V*N, ...) activations.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_STATELESS = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
              nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
              nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Sequential, nn.ModuleList)


class _Store:
    """The per-victim tensors of the current evaluation, by parameter name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.victims = 1


class _EConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, name: str, store: _Store) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError("only zero padding given as numbers")
        self.name, self.store = name, store
        self.kernel, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.cin, self.cout = conv.in_channels, conv.out_channels
        self.has_bias = conv.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.store.tensors[self.name + ".weight"]  # (V, Cout, Cin/G, kh, kw)
        v = w.shape[0]
        b, _, h, wd = x.shape
        n = b // v
        kh, kw = self.kernel
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (wd + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        p = ho * wo
        g = self.groups
        k = (self.cin // g) * kh * kw
        if kh == kw == 1 and self.stride == (1, 1) and self.padding == (0, 0) and g == 1:
            cols = x.reshape(v, n, self.cin, p)
        else:
            cols = F.unfold(x, self.kernel, self.dilation, self.padding, self.stride).view(v, n, g * k, p)
        if g == 1:
            # (V, Cout, K) @ (V, K, N*P)
            cols = cols.transpose(1, 2).reshape(v, k, n * p) if n > 1 else cols.view(v, k, p)
            out = torch.bmm(w.reshape(v, self.cout, k), cols)  # (V, Cout, N*P)
            out = out.view(v, self.cout, n, p).transpose(1, 2) if n > 1 else out.view(v, 1, self.cout, p)
        elif self.cout == g and self.cin == g:  # depthwise: a broadcast multiply-sum
            cols = cols.view(v, n, g, k, p)
            out = (cols * w.reshape(v, 1, g, k, 1)).sum(3)  # (V, N, C, P)
        else:
            cols = cols.view(v, n, g, k, p).permute(0, 2, 3, 1, 4).reshape(v, g, k, n * p)
            out = torch.matmul(w.reshape(v, g, self.cout // g, k), cols)  # (V, G, Cout/G, N*P)
            out = out.view(v, self.cout, n, p).transpose(1, 2)
        out = out.reshape(b, self.cout, ho, wo)
        if self.has_bias:
            out = out + self.store.tensors[self.name + ".bias"].reshape(v, 1, self.cout, 1, 1).expand(
                v, n, self.cout, 1, 1).reshape(b, self.cout, 1, 1)
        return out


class _ELinear(nn.Module):
    def __init__(self, lin: nn.Linear, name: str, store: _Store) -> None:
        super().__init__()
        self.name, self.store, self.has_bias = name, store, lin.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.store.tensors[self.name + ".weight"]  # (V, out, in)
        v = w.shape[0]
        xs = x.reshape(v, -1, x.shape[-1])
        out = torch.bmm(xs, w.transpose(1, 2))
        if self.has_bias:
            out = out + self.store.tensors[self.name + ".bias"].unsqueeze(1)
        return out.reshape(-1, out.shape[-1])


class _EBatchNorm2d(nn.Module):
    def __init__(self, bn: nn.BatchNorm2d, name: str, store: _Store, train: bool) -> None:
        super().__init__()
        self.name, self.store, self.eps = name, store, bn.eps
        self.affine = bn.affine
        self.train_stats = train or bn.running_mean is None
        if not self.train_stats:
            self.register_buffer("rm", bn.running_mean.detach().clone())
            self.register_buffer("rv", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.store.victims
        b, c = x.shape[:2]
        xs = x.reshape(v, b // v, c, -1)
        if self.train_stats:  # each victim's batch on its own statistics
            var, mean = torch.var_mean(xs, dim=(1, 3), unbiased=False, keepdim=True)
            if xs.shape[1] * xs.shape[3] <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        else:
            mean, var = self.rm.view(1, 1, c, 1), self.rv.view(1, 1, c, 1)
        y = (xs - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            w = self.store.tensors[self.name + ".weight"].view(v, 1, c, 1)
            bias = self.store.tensors[self.name + ".bias"].view(v, 1, c, 1)
            y = torch.addcmul(bias, y, w)
        return y.reshape(x.shape)


def supports(model: nn.Module) -> str | None:
    """None if every module can be expanded, else the first one that cannot."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                return f"{name}: {type(m).__name__} with padding mode {m.padding_mode!r}"
            continue
        if isinstance(m, _STATELESS) or not any(True for _ in m.parameters(recurse=False)):
            if isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm | nn.Conv1d | nn.Conv3d
                          | nn.ConvTranspose2d | nn.Embedding):
                return f"{name}: {type(m).__name__}"
            continue
        return f"{name}: {type(m).__name__}"
    return None


class ExpandedModel:
    """A copy of a model whose layers take per-victim parameters (V, ...)."""

    def __init__(self, model: nn.Module, bn_train: bool) -> None:
        why = supports(model)
        if why:
            raise NotImplementedError(f"cannot expand the model: {why}")
        self.store = _Store()
        net = copy.deepcopy(model)
        for name, module in list(net.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Conv2d):
                    setattr(module, child_name, _EConv2d(child, full, self.store))
                elif isinstance(child, nn.Linear):
                    setattr(module, child_name, _ELinear(child, full, self.store))
                elif isinstance(child, nn.BatchNorm2d):
                    setattr(module, child_name, _EBatchNorm2d(child, full, self.store, bn_train))
                elif isinstance(child, nn.Dropout | nn.Dropout2d):
                    setattr(module, child_name, nn.Identity())
        self.net = net.eval()  # no module here has train/eval behaviour left

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """params: per-victim (V, ...) tensors by name; x: (V*N, C, H, W) -> (V*N, classes)."""
        self.store.tensors = params
        self.store.victims = next(iter(params.values())).shape[0]
        try:
            return self.net(x)
        finally:
            self.store.tensors = {}

    def update(self, shared: dict[str, torch.Tensor], names: list[str], inp: torch.Tensor, labels: torch.Tensor,
               kind: str, local_lr: float = 0.0, local_steps: int = 1, local_batch_size: int = 0,
               create_graph: bool = True) -> list[torch.Tensor]:
        """Per-victim updates (V, ...) for inputs inp (V, N, C, H, W) and labels (V, N): the
        FedSGD gradient, or the FedAvg weight difference unrolled over the local steps."""
        v, n = inp.shape[:2]
        params = {k: p.detach().unsqueeze(0).expand(v, *p.shape).requires_grad_(True) for k, p in shared.items()}
        keys = list(params)

        def loss_of(current: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = self.logits(current, x.reshape(-1, *x.shape[2:]))
            # Sum over victims of each victim's mean loss: victim v's gradient is its own.
            return F.cross_entropy(out, y.reshape(-1), reduction="sum") / y.shape[1]

        if kind == "gradient":
            grads = torch.autograd.grad(loss_of(params, inp, labels), [params[k] for k in names],
                                        create_graph=create_graph)
            return list(grads)
        b = local_batch_size if 0 < local_batch_size < n else n
        current = dict(params)
        total: dict[str, torch.Tensor] = {}
        for s in range(local_steps):
            idx = [(s * b + j) % n for j in range(b)]
            xb, yb = (inp[:, idx], labels[:, idx]) if b < n else (inp, labels)
            grads = torch.autograd.grad(loss_of(current, xb, yb), [current[k] for k in keys],
                                        create_graph=create_graph)
            for k, g in zip(keys, grads):
                total[k] = total[k] + g if k in total else g
                current[k] = current[k] - local_lr * g
        return [-local_lr * total[k] for k in names]
