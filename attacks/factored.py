"""FedSGD gradient matching without materialising the parameter gradients.

The gradient of a convolution's weight for one victim is dW = A B^T with A the gradient at the
layer's output (Cout x R) and B the unfolded input (K x R), R = images x output positions.
Matching only needs <dW, T> = sum(A * (T B)) and |dW|^2 = sum((A^T A) * (B^T B)). Where R is
small (ResNet18's last stages: 2x2 maps at 64 px hold 75 % of the parameters), these cost two
reads of the target and R x R Gram matrices instead of writing, reading and back-propagating
through Cout x K gradient tensors; where R is large (first layers, few parameters) the small
dW is formed directly. Linear layers are the same with R = images; BatchNorm and bias
gradients are formed directly (they are small).

So one iteration needs the model's forward at batch V x N with shared weights (the fast
convolution kernels), the gradients at each layer's output (a backward without weight
gradients), and the double backward of those, with none of the weight-gradient convolutions
and none of the parameter-sized temporaries of the usual formulation. V victims of the same
round share the weights; each has its own BatchNorm batch statistics, labels and target.

Only for FedSGD gradients (a weight difference needs the unrolled steps) and for the
gradient-matching terms (L2, cosine, per-layer cosine, per-layer weights). Near the optimum
the expanded forms cancel in float32; callers switch to the exact formulation there.

precision="bf16" runs the convolutions, their backward and double backward, BatchNorm with
running statistics, and the products that form or contract the weight gradients in bfloat16
(CPUs with AVX512-BF16 or AMX, and recent GPUs, run these 2-3x faster than float32), while
every reduction that makes a matching term (<g, t>, |g|^2 and their sums over layers)
accumulates in float32 or float64. With BatchNorm on batch statistics bf16 is not usable
(the image gradient's signs agree with float32's only 53-58 % of the time, against 89-95 %
with running statistics): `matching_precision("auto", ...)` keeps float32 there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attacks.expanded import supports

__all__ = ["FactoredMatcher", "supports", "bf16_supported"]
# A convolution's weight gradient is contracted through R x R Gram matrices when
# R^2 (Cout + K) <= _GRAM_RATIO * Cout * K, else formed: a formed gradient costs passes over
# Cout x K memory, a Gram matrix only GEMM FLOPs, which run many times faster per element.
# 64 moves ResNet18's layer3 at 112 px (R = 49) to the Gram form: 15-18 -> 18-19 victim-it/s
# (8 victims, bf16); 4 before.
_GRAM_RATIO = 64
# A masked factored layer (an adaptive attack under pruning) takes |M * dW|^2 through R^2
# column products while R^2 <= this, else forms dW and masks it. ResNet18, 64 px, pruning
# 80 %, one victim, bf16, s/iteration: 0.101 always formed, 0.088 at 16, 0.073 at 64, 0.100
# at 256 (layer2's R = 64 then goes through 4096 products); the exact path 0.106.
_MASKED_GEMM_MAX = 64


def _gram_form(r: int, cout: int, k: int) -> bool:
    """Whether a weight gradient of Cout x K over R positions is contracted through Gram matrices."""
    return r * r * (cout + k) <= _GRAM_RATIO * cout * k


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 convolutions and GEMMs run on fast kernels on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (a bf16 result widened; float64 in tests left alone)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class _DenseTerms(torch.autograd.Function):
    """(<g, t>, <g, g>) per victim of g (V, n) and t (V or 1, n): BLAS dots forward and one fused
    pass backward, where `(g * t).sum(1)` and `g.pow(2).sum(1)` would write and re-read four
    parameter-sized temporaries (these passes were a fifth of an iteration)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(g, t)
        shared = t.shape[0] == 1
        gt = torch.stack([torch.dot(g[i], t[0 if shared else i]) for i in range(g.shape[0])])
        gg = torch.stack([torch.dot(g[i], g[i]) for i in range(g.shape[0])])
        return gt, gg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gt: torch.Tensor, d_gg: torch.Tensor):
        g, t = ctx.saved_tensors
        grad = torch.mul(t, d_gt.view(-1, 1)).addcmul_(g, (2 * d_gg).view(-1, 1))
        return grad, None


@dataclass
class _Record:
    kind: str  # conv, linear, bn
    name: str
    inp: torch.Tensor  # conv/linear: the layer input; bn: the normalised input x_hat
    out: torch.Tensor
    cols: torch.Tensor | None = None  # conv: the unfolded input when the forward made it


class _Store:
    def __init__(self) -> None:
        self.records: list[_Record] = []
        self.victims = 1


class _FConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, name: str, store: _Store) -> None:
        super().__init__()
        self.conv, self.name, self.store = conv, name, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if c.groups > 1 and c.groups == c.in_channels == c.out_channels:
            # Depthwise as unfold + broadcast multiply-sum: the double backward of a grouped
            # convolution loops over its groups (thousands of tiny convolutions per iteration
            # in MobileNetV2); fold/unfold and elementwise ops do not.
            b, ch, h, w = x.shape
            kh, kw = c.kernel_size
            ho = (h + 2 * c.padding[0] - c.dilation[0] * (kh - 1) - 1) // c.stride[0] + 1
            wo = (w + 2 * c.padding[1] - c.dilation[1] * (kw - 1) - 1) // c.stride[1] + 1
            cols = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride).view(b, ch, kh * kw, ho * wo)
            out = (cols * c.weight.view(1, ch, kh * kw, 1)).sum(2).view(b, ch, ho, wo)
            if c.bias is not None:
                out = out + c.bias.view(1, ch, 1, 1)
            self.store.records.append(_Record("conv", self.name, x, out, cols))
            return out.clone()
        out = c(x)
        self.store.records.append(_Record("conv", self.name, x, out))
        return out.clone()  # the model may modify its output in place (ReLU(inplace), +=)


class _FLinear(nn.Module):
    def __init__(self, lin: nn.Linear, name: str, store: _Store) -> None:
        super().__init__()
        self.lin, self.name, self.store = lin, name, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        self.store.records.append(_Record("linear", self.name, x, out))
        return out.clone()


class _FBatchNorm2d(nn.Module):
    def __init__(self, bn: nn.BatchNorm2d, name: str, store: _Store, train: bool) -> None:
        super().__init__()
        self.name, self.store, self.eps, self.affine = name, store, bn.eps, bn.affine
        self.train_stats = train or bn.running_mean is None
        if bn.affine:
            self.weight, self.bias = bn.weight, bn.bias
        if not self.train_stats:
            self.register_buffer("rm", bn.running_mean.detach().clone())
            self.register_buffer("rv", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With running statistics BatchNorm is an affine map, run in the precision of the
        # convolution before it (+5 % at 112 px in bf16). Batch statistics of a victim's few
        # images cancel catastrophically in bf16: widened first (once; a mixed-dtype
        # elementwise op would take PyTorch's slow casting path).
        if self.train_stats:
            x = _wide(x)
        v = self.store.victims
        b, c = x.shape[:2]
        xs = x.reshape(v, b // v, c, -1)
        if self.train_stats:  # each victim's batch on its own statistics
            if xs.shape[1] * xs.shape[3] <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
            var, mean = torch.var_mean(xs, dim=(1, 3), unbiased=False, keepdim=True)
        else:
            mean, var = self.rm.view(1, 1, c, 1).to(x.dtype), self.rv.view(1, 1, c, 1).to(x.dtype)
        xhat = ((xs - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if not self.affine:
            return xhat
        out = torch.addcmul(self.bias.view(1, c, 1, 1).to(x.dtype), xhat, self.weight.view(1, c, 1, 1).to(x.dtype))
        self.store.records.append(_Record("bn", self.name, xhat, out))
        return out.clone()


class FactoredMatcher:
    """Per-victim gradient-matching losses of FedSGD cases sharing one model's weights.

    targets: the observed gradients by parameter name, each (V, *shape); weights: the layer
    weight of each parameter name (missing names are not matched).
    """

    def __init__(self, model: nn.Module, bn_train: bool, names: list[str], targets: list[torch.Tensor],
                 layer_weights: list[float], kind: str = "cosine", scale: float = 1.0,
                 precision: str = "fp32", masks: dict[str, torch.Tensor] | None = None) -> None:
        why = supports(model)
        if why:
            raise NotImplementedError(f"factored matching does not support {why}")
        if kind not in ("l2", "cosine", "cosine-layer"):
            raise ValueError(kind)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.kind, self.scale = kind, scale
        self.low = torch.bfloat16 if precision == "bf16" else None
        self.store = _Store()
        net = copy.deepcopy(model)
        for p in net.parameters():
            p.requires_grad_(False)
        for name, module in list(net.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Conv2d):
                    setattr(module, child_name, _FConv2d(child, full, self.store))
                elif isinstance(child, nn.Linear):
                    setattr(module, child_name, _FLinear(child, full, self.store))
                elif isinstance(child, nn.BatchNorm2d):
                    setattr(module, child_name, _FBatchNorm2d(child, full, self.store, bn_train))
                elif isinstance(child, nn.Dropout | nn.Dropout2d):
                    setattr(module, child_name, nn.Identity())
        self.net = net.eval()
        self.targets = dict(zip(names, targets))
        # The contraction T b of a factored layer reads the target in the GEMM's precision.
        self.targets_low = {n: t.to(self.low) for n, t in self.targets.items()} if self.low else self.targets
        self.weights = dict(zip(names, layer_weights))
        self.victims = targets[0].shape[0]
        w = torch.tensor(layer_weights, dtype=torch.float64)
        tt = torch.stack([t.reshape(t.shape[0], -1).double().pow(2).sum(1) for t in targets])  # (L, V)
        self.tt = dict(zip(names, tt))
        # An adaptive attack's model of a zeroing defense (fl_sim.defenses.ZeroPattern): the
        # trial gradient is matched only where the observed one is non-zero. The target is zero
        # elsewhere, so <m g, t> = <g, t>; only |m g|^2 changes (`_masked_norm`).
        self.masks = {n: m.reshape(m.shape[0], -1) for n, m in (masks or {}).items() if n in self.targets}
        self.nt = (w.view(-1, 1) * tt).sum(0).sqrt()  # (V,)
        self.wsum = float(w.sum())

    def __call__(self, inp: torch.Tensor, labels: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
        """inp: (V, N, C, H, W) normalised model input, labels (V, N) -> losses (V,).

        With targets of batch 1 every one of the V inputs is matched against the same target
        (candidates of one victim, as in GGL). create_graph=False: values only (no image
        gradient), cheaper."""
        v, n = labels.shape
        if self.victims not in (1, v):
            raise ValueError(f"{v} inputs for targets of {self.victims} victims")
        if not inp.requires_grad:  # the layer-output gradients need a graph to exist
            inp = inp.detach().requires_grad_(True)
        self.store.records = []
        self.store.victims = v
        low = self.low is not None
        with torch.autocast(inp.device.type, dtype=self.low or torch.bfloat16, enabled=low):
            out = self.net(inp.reshape(v * n, *inp.shape[2:]))
            records, self.store.records = self.store.records, []
            ce = F.cross_entropy(_wide(out), labels.reshape(-1), reduction="sum") / n
            gouts = torch.autograd.grad(ce, [r.out for r in records], create_graph=create_graph)
            terms = [t for rec, gout in zip(records, gouts) for t in self._layer_terms(rec, gout, v, n)]
        gt_sum = torch.zeros(v, dtype=torch.float64, device=inp.device)
        gg_sum = torch.zeros_like(gt_sum)
        per_layer = []
        for pname, gt, gg in terms:
            if pname not in self.targets:
                continue
            w = self.weights[pname]
            gt, gg = gt.double(), gg.double()
            if self.kind == "cosine-layer":
                per_layer.append(w * (1 - gt / (gg.clamp_min(1e-30).sqrt() * self.tt[pname].sqrt().clamp_min(1e-30))))
            elif self.kind == "l2":
                gt_sum = gt_sum + w * (gg - 2 * gt + self.tt[pname])
            else:
                gt_sum = gt_sum + w * gt
                gg_sum = gg_sum + w * gg
        if self.kind == "cosine":
            loss = 1 - gt_sum / (gg_sum.clamp_min(1e-30).sqrt() * self.nt.clamp_min(1e-30))
        elif self.kind == "l2":
            loss = gt_sum
        else:
            loss = torch.stack(per_layer).sum(0) / self.wsum
        loss = loss.to(inp.dtype)
        return loss * self.scale if self.scale != 1.0 else loss

    # -- per layer: (parameter name, <g, t>, <g, g>) for each parameter, each (V,) -----------------
    def _layer_terms(self, rec: _Record, gout: torch.Tensor, v: int, n: int):
        if rec.kind == "bn":
            c = gout.shape[1]
            go = gout.reshape(v, n, c, -1)
            xh = rec.inp.reshape(v, n, c, -1)
            dgamma = (go * xh).sum((1, 3))
            dbeta = go.sum((1, 3))
            yield from self._dense(rec.name + ".weight", dgamma)
            yield from self._dense(rec.name + ".bias", dbeta)
            return
        if rec.kind == "linear":
            a = gout.reshape(v, n, -1).transpose(1, 2)  # (V, out, N)
            b = rec.inp.reshape(v, n, -1).transpose(1, 2)  # (V, in, N)
            yield from self._factored(rec.name + ".weight", a, b)
            yield from self._dense(rec.name + ".bias", a.sum(2))
            return
        conv: nn.Conv2d = self._module(rec.name)
        cout, g = conv.out_channels, conv.groups
        p = gout.shape[2] * gout.shape[3]
        a = gout.reshape(v, n, cout, p)
        k1 = conv.weight[0].numel()
        if g == 1 and rec.cols is None and not _gram_form(n * p, cout, k1):
            # Formed gradient: the convolution library's weight-gradient kernel, victims as
            # groups (no unfolded input, no transposed copies).
            yield from self._dense(rec.name + ".weight", self._conv_weight_grad(conv, rec.inp, gout, v, n))
            if conv.bias is not None:
                yield from self._dense(rec.name + ".bias", a.sum((1, 3)))
            return
        if rec.cols is not None:
            cols = rec.cols.reshape(v, n, -1, p)
        elif conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
            cols = rec.inp.reshape(v, n, conv.in_channels, p)
        else:
            cols = F.unfold(rec.inp, conv.kernel_size, conv.dilation, conv.padding, conv.stride).reshape(v, n, -1, p)
        k = cols.shape[2] // g
        if g == 1:
            a2 = a.transpose(1, 2).reshape(v, cout, n * p) if n > 1 else a.reshape(v, cout, p)
            b2 = cols.transpose(1, 2).reshape(v, k, n * p) if n > 1 else cols.reshape(v, k, p)
            r = n * p
            if _gram_form(r, cout, k):
                yield from self._factored(rec.name + ".weight", a2, b2)
            else:
                yield from self._dense(rec.name + ".weight", torch.bmm(a2, b2.transpose(1, 2)))
        elif cout == g and conv.in_channels == g:  # depthwise: dW[c, k] = sum_r A[c, r] B[c, k, r]
            dw = (a.unsqueeze(3) * cols.reshape(v, n, g, k, p)).sum((1, 4))  # (V, C, k)
            yield from self._dense(rec.name + ".weight", dw)
        else:
            a3 = a.reshape(v, n, g, cout // g, p).permute(0, 2, 3, 1, 4).reshape(v, g, cout // g, n * p)
            b3 = cols.reshape(v, n, g, k, p).permute(0, 2, 3, 1, 4).reshape(v, g, k, n * p)
            yield from self._dense(rec.name + ".weight", torch.matmul(a3, b3.transpose(2, 3)))
        if conv.bias is not None:
            yield from self._dense(rec.name + ".bias", a.sum((1, 3)))

    @staticmethod
    def _conv_weight_grad(conv: nn.Conv2d, inp: torch.Tensor, gout: torch.Tensor, v: int, n: int) -> torch.Tensor:
        """Per-victim weight gradients (V, Cout * K) of a convolution, twice differentiable."""
        cin, cout = conv.in_channels, conv.out_channels
        x = inp.to(gout.dtype).reshape(v, n, cin, *inp.shape[2:]).transpose(0, 1).reshape(n, v * cin, *inp.shape[2:])
        go = gout.reshape(v, n, cout, *gout.shape[2:]).transpose(0, 1).reshape(n, v * cout, *gout.shape[2:])
        dw = torch.nn.grad.conv2d_weight(x, (v * cout, cin, *conv.kernel_size), go, conv.stride, conv.padding,
                                         conv.dilation, groups=v)
        return dw.reshape(v, -1)

    def _module(self, name: str) -> nn.Conv2d:
        return self.net.get_submodule(name).conv

    def _dense(self, pname: str, grad: torch.Tensor):
        t = self.targets.get(pname)
        if t is None:
            return
        g = grad.reshape(grad.shape[0], -1).to(t.dtype)
        mask = self.masks.get(pname)
        if mask is not None:
            g = g * mask.to(g.device, g.dtype)
        gt, gg = _DenseTerms.apply(g, t.reshape(t.shape[0], -1))
        yield pname, gt, gg

    def _factored(self, pname: str, a: torch.Tensor, b: torch.Tensor):
        """dW = a b^T per victim, a (V, O, R), b (V, I, R), never formed."""
        t = self.targets_low.get(pname)
        if t is None:
            return
        b = b.to(a.dtype)
        # (T b)^T = b^T T^T: with R small this orientation runs 3-4x faster on the CPU (forward
        # and backward) than bmm(T, b), whose skinny product MKL handles poorly.
        v, o, r = a.shape
        if t.shape[0] == 1 and v > 1:  # one target for all inputs: a single GEMM
            tb_t = (b.transpose(1, 2).reshape(v * r, -1) @ t.reshape(o, -1).T).view(v, r, o)
        else:
            tb_t = torch.bmm(b.transpose(1, 2), t.reshape(t.shape[0], o, b.shape[1]).transpose(1, 2))
        gt = (_wide(a.transpose(1, 2)) * _wide(tb_t)).sum((1, 2))
        mask = self.masks.get(pname)
        if mask is not None and r * r <= _MASKED_GEMM_MAX:
            gg = self._masked_norm(a, b, mask)
        elif mask is not None:  # R^2 products cost more than forming dW and masking it
            g = torch.bmm(a, b.transpose(1, 2)).reshape(v, -1)
            gg = _wide(g * mask.to(g.device, g.dtype)).pow(2).sum(1)
        else:
            gg = (_wide(torch.bmm(a.transpose(1, 2), a)) * _wide(torch.bmm(b.transpose(1, 2), b))).sum((1, 2))
        yield pname, gt, gg

    @staticmethod
    def _masked_norm(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """|M * dW|^2 per victim for dW = a b^T (a: V x O x R, b: V x I x R), M a 0/1 mask.

        sum_ij M_ij (sum_r a_ir b_jr)^2 = sum_rs sum_ij M_ij (a_ir a_is)(b_jr b_js): one GEMM of
        the mask with the R^2 column products of b, O x I x R^2 multiply-adds, where R is small
        (the factored layers); forming dW and masking it would cost passes over O x I memory."""
        v, o, r = a.shape
        pa = _wide(a.unsqueeze(3) * a.unsqueeze(2)).reshape(v, o, r * r)
        pb = _wide(b.unsqueeze(3) * b.unsqueeze(2)).reshape(v, -1, r * r)
        m = mask.to(pa.device, pa.dtype).reshape(mask.shape[0], o, -1)
        mpb = torch.matmul(m, pb)  # (V, O, R^2); a mask shared by all inputs broadcasts
        return (pa * mpb).sum((1, 2))
