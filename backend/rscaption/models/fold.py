"""An inference copy of a CNN image tower: batch norms folded into the convolutions before them,
weights in channels-last memory order, and on the CPU each convolution with its bias and
activation in one oneDNN call.

Profiling the EfficientNet-Lite tower on the CPU showed half its time in eval-mode batch norm
(one extra pass over every activation) and the 1x1 convolutions on a slow path in channels-first
order; folding and channels-last remove both.  The copy is separate from the trained tower so
training, saving and hashing never see folded weights, and it is checked against the original on
a probe batch before use: a tower this code does not understand is simply left as it is.

After folding, separate passes still added the folded bias and clamped (ReLU6) every activation;
oneDNN applies both inside the convolution (``mkldnn._convolution_pointwise``, the call PyTorch's
own compiler emits for conv + activation on the CPU) and runs the 1x1 and depthwise convolutions
faster than the eager paths: 18-19 -> 14 ms per 224 px tile on one core in fp32, 11.5 -> 6 in bf16.

On the CPU, the high-resolution first stages then run in sub-batches (``_HighResChunks``): at
batch 8 their widest activation (96 x 112 x 112 floats a tile) is 38.5 MB, more than glibc will
keep on its heap (32 MB), so every call mapped fresh pages and faulted them in: half the tower's
time went to the first two stages, which hold 14 % of its FLOPs.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..device import mkldnn_fusion_available

# Folding changes rounding only; a larger gap means the tower is not what the folding assumed.
FOLD_TOLERANCE = 1e-3
# Largest activation a sub-batch of the high-resolution stages may make: under the 32 MB above which
# glibc's malloc maps (and the kernel zero-fills) fresh memory on every call.
CHUNK_BYTES = 24 * 2 ** 20


class _AfterNorm(nn.Module):
    """What remains of a timm BatchNormAct2d once its affine part lives in the convolution."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x):
        return self.act(self.drop(x))


class _Pointwise(nn.Module):
    """A 1x1, stride-1, ungrouped convolution as one matrix product over channels-last pixels:
    on the CPU torch sends small-batch 1x1 convolutions to a slow im2col path instead."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach()[:, :, 0, 0].contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias)  # [N, H, W, C]: no copy when channels-last
        return y.permute(0, 3, 1, 2)


def _fusable_act(act: nn.Module | None) -> tuple[str, list] | None:
    """oneDNN's name and scalars for an activation it can apply inside the convolution; None
    for one it cannot (it then stays a module after the convolution)."""
    if act is None or type(act) is nn.Identity:
        return "none", []
    if type(act) is nn.ReLU:
        return "relu", []
    if type(act) is nn.ReLU6:
        return "hardtanh", [0.0, 6.0]
    if type(act) is nn.Hardtanh:
        return "hardtanh", [float(act.min_val), float(act.max_val)]
    if type(act) is nn.SiLU:
        return "swish", []
    return None


def can_fuse(device: torch.device | str) -> bool:
    """oneDNN's fused convolution exists in this torch and the tower runs on the CPU."""
    return torch.device(device).type == "cpu" and mkldnn_fusion_available()


class _FusedConv(nn.Module):
    """conv (batch norm folded in) + bias + activation in one oneDNN call on channels-last input."""

    def __init__(self, conv: nn.Conv2d, attr: str, scalars: list):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.attr, self.scalars = attr, scalars

    def forward(self, x):
        padding, stride, dilation, groups = self.geometry
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, padding, stride, dilation, groups,
                                                       self.attr, self.scalars, "")


def _fusable_conv(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _is_pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1))


class _Tracer(fx.Tracer):
    """Keeps convolutions and batch norms (timm's BatchNormAct2d included) as single nodes."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batch-norm name) where the norm reads nothing but that convolution's output."""
    graph = _Tracer().trace(model)
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def folded_copy(tower: nn.Module, probe: torch.Tensor | None = None,
                fuse: bool | None = None) -> tuple[nn.Module, int]:
    """An eval-mode, channels-last copy of ``tower`` with conv->BN pairs folded (and, with ``fuse``,
    default: on the CPU when oneDNN is there, each folded convolution fused with its activation);
    returns (copy, number of folded pairs).  Falls back to an unfolded channels-last copy when the
    tower cannot be traced or the folded copy disagrees with the original on ``probe``."""
    if fuse is None:
        fuse = can_fuse(next(tower.parameters()).device)
    with torch.no_grad():
        fast = copy.deepcopy(tower).eval().requires_grad_(False)
        try:
            pairs = conv_bn_pairs(fast)
        except Exception:  # not traceable (dynamic control flow): channels-last only
            pairs = []
        for conv_name, bn_name in pairs:
            bn, conv = fast.get_submodule(bn_name), fast.get_submodule(conv_name)
            _fold(conv, bn)
            act = getattr(bn, "act", None)
            fused_act = _fusable_act(act) if fuse and _fusable_conv(conv) else None
            if fused_act is not None:  # eval-mode dropout (bn.drop) is the identity: the act moves in
                _set(fast, conv_name, _FusedConv(conv, *fused_act))
                _set(fast, bn_name, nn.Identity())
                continue
            _set(fast, bn_name, _AfterNorm(bn.drop, act) if act is not None else nn.Identity())
        pointwise = [n for n, m in fast.named_modules() if _is_pointwise(m)]
        for name in pointwise:
            _set(fast, name, _Pointwise(fast.get_submodule(name)))
        fast = fast.to(memory_format=torch.channels_last)
        if pairs and probe is not None:
            ref = tower.eval()(probe)
            got = fast(probe.contiguous(memory_format=torch.channels_last))
            if not torch.allclose(got, ref, atol=FOLD_TOLERANCE, rtol=FOLD_TOLERANCE):
                fast = copy.deepcopy(tower).eval().requires_grad_(False).to(memory_format=torch.channels_last)
                pairs = []
        if fuse and probe is not None:
            fast = _HighResChunks.wrap(fast, probe[:1].contiguous(memory_format=torch.channels_last))
    return fast, len(pairs)


class _HighResChunks(nn.Module):
    """A timm EfficientNet whose stem and high-resolution blocks (input at least 1/4 of the image
    side) run in as few equal sub-batches as keep every activation under ``CHUNK_BYTES``; the rest
    of the tower runs on the whole batch, where weights are reused across images. Measured at
    batch 8 on one core: fp32 12.3 -> 8.5-9.1 ms per 224 px tile; bf16 (19 MB) is left whole."""

    def __init__(self, tower: nn.Module, split: int, elems_per_image: int):
        super().__init__()
        self.tower, self.split, self.elems_per_image = tower, split, elems_per_image

    @classmethod
    def wrap(cls, tower: nn.Module, probe: torch.Tensor) -> nn.Module:
        """``tower`` wrapped, or as it is when it is not a timm EfficientNet (stem, blocks, head)."""
        if not all(hasattr(tower, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
            return tower
        side, sizes, split = probe.shape[-1], [], 0

        def record(module, inputs, output):
            sizes.append(output.numel())

        hooks = [m.register_forward_hook(record) for m in (tower.conv_stem, tower.bn1)]
        with torch.no_grad():
            h = tower.bn1(tower.conv_stem(probe))
            for block in tower.blocks:
                if h.shape[-1] * 4 < side:
                    break
                hooks += [m.register_forward_hook(record) for m in block.modules() if m is not block]
                h = block(h)
                split += 1
        for hook in hooks:
            hook.remove()
        return cls(tower, split, max(sizes)) if split else tower

    def forward(self, x):
        t = self.tower
        pieces = -(-len(x) * self.elems_per_image * x.element_size() // CHUNK_BYTES)
        if pieces <= 1:  # bf16 at batch 8: already small enough, and sub-batches would cost a little
            return t(x)
        chunk = -(-len(x) // pieces)
        parts = []
        for i in range(0, len(x), chunk):
            h = t.bn1(t.conv_stem(x[i:i + chunk]))
            for block in t.blocks[:self.split]:
                h = block(h)
            parts.append(h)
        h = torch.cat(parts)
        for block in t.blocks[self.split:]:
            h = block(h)
        return t.forward_head(t.bn2(t.conv_head(h)))
