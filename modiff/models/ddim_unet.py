"""The UNet of the official DDIM/DDPM checkpoints (CIFAR-10, LSUN church/bedroom, CelebA).

Module names, parameter shapes and the forward pass follow the official DDIM code so that its
checkpoints load strictly and give the same outputs: sinusoidal timestep embedding (sin then cos,
log(10000) / (half - 1) spacing), GroupNorm(32, eps=1e-6), swish, single-head attention with 1x1
q/k/v/proj_out convolutions, a (0, 1, 0, 1) zero pad before the stride-2 downsampling conv, and
nearest-neighbour upsampling followed by a 3x3 conv.

Shapes: x (B, C_in, H, W), t (B,) integer timesteps (as floats or ints) -> eps (B, C_out, H, W).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DDIMUNetConfig", "DDIMUNet", "ddim_unet_from_config", "timestep_embedding", "GroupNorm", "per_channel_group_norm",
           "fast_path_input", "pointwise_projections"]


@dataclass(frozen=True)
class DDIMUNetConfig:
    """The `model` section of an official DDIM YAML config, plus the image size from `data`."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    in_channels: int = 3
    resamp_with_conv: bool = True
    image_size: int = 32
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {self.ch}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        downsamples = len(self.ch_mult) - 1
        if self.image_size % (2**downsamples):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{downsamples} "
                f"(len(ch_mult) - 1 downsamplings)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the official code: (B,) -> (B, dim), sin half then cos half."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (batch,), got shape {tuple(t.shape)}")
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def per_channel_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """F.group_norm of ``x`` (B, C, ...) in float32, its statistics built from per-channel sums over the
    pixels. With channels_last a group is a few adjacent channels of each pixel, which inductor's group
    reduction reads strided; a per-channel sum reads whole pixels. One pass for both moments (E[x^2] - E[x]^2
    in float32: a layer input's mean is within a few standard deviations of zero)."""
    h = x.float()
    batch, channels = h.shape[:2]
    pixels = tuple(range(2, h.ndim))
    mean = h.mean(dim=pixels).view(batch, num_groups, -1).mean(-1)
    var = ((h * h).mean(dim=pixels).view(batch, num_groups, -1).mean(-1) - mean * mean).clamp_min(0.0)
    per_group, shape = channels // num_groups, (batch, channels) + (1,) * len(pixels)
    scale = torch.rsqrt(var + eps).repeat_interleave(per_group, dim=1) * weight.float()
    shift = bias.float() - mean.repeat_interleave(per_group, dim=1) * scale
    return h * scale.view(shape) + shift.view(shape)


def fast_path_input(x: torch.Tensor) -> bool:
    """Whether a GroupNorm input comes from the CUDA fast path (autocast, channels_last), where
    `per_channel_group_norm` replaces F.group_norm; everywhere else (the CPU, float32 and tf32 runs, the
    reference arithmetic) F.group_norm runs."""
    return (x.is_cuda and x.ndim == 4 and torch.is_autocast_enabled("cuda")
            and x.is_contiguous(memory_format=torch.channels_last))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state_dict keys) that takes `per_channel_group_norm` on the fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path_input(x) and self.affine:
            return per_channel_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def group_norm(channels: int) -> GroupNorm:
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # The official asymmetric padding: one zero row/column at the bottom/right only.
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; `attention` is a separate module so it can be quantized."""

    shared_input = ("q", "k", "v")  # read one tensor, in this order (`modiff.quant.trajectory`)

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.attention = AttentionCore()
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = self.attention(*pointwise_projections(h, (self.q, self.k, self.v)))
        return x + self.proj_out(h)


def pointwise_projections(x: torch.Tensor, convs: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """The 1x1 convolutions ``convs`` of one input x (B, C, H, W), such as an attention block's q, k and v.

    On the CUDA fast path (`fast_path_input`), where every module is a plain 1x1 nn.Conv2d or computes its
    product from `linear_operands` (a simulated MoDiff layer, whose state advances in that call) and
    no hook observes any of them, the products whose operand is one tensor run as one matmul over the pixels
    with the concatenated weights and the biases in its epilogue. Separately, inductor peels each
    convolution's bias into a pass of its own, written out before the attention reads q, k and v (measured:
    benchmarks/README.md, "Full-precision sampling", sitting 30). Elsewhere each module is called."""
    if not (fast_path_input(x) and all(_exposes_operands(m) for m in convs)):
        return tuple(m(x) for m in convs)
    operands = [m.linear_operands(x) if type(m) is not nn.Conv2d else (x, m.weight, m.bias) for m in convs]
    if all(a is operands[0][0] for a, _, _ in operands):
        return _one_matmul(operands[0][0], [w for _, w, _ in operands], [b for _, _, b in operands])
    return tuple(F.conv2d(a, w, b) for a, w, b in operands)


def _exposes_operands(module: nn.Module) -> bool:
    """Whether `pointwise_projections` may compute ``module``'s 1x1 product itself: nothing hooks the module
    (a recorder or an observer would miss the call) and its forward is the product of its `linear_operands`
    (`product_of_operands`), or it is a plain nn.Conv2d."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or module._forward_hooks \
            or module._forward_pre_hooks:
        return False
    if type(module) is nn.Conv2d:
        geometry = {key: getattr(module, key) for key in _POINTWISE}
    elif getattr(module, "product_of_operands", False):
        geometry = dict(getattr(module.op, "keywords", {}))  # a QuantLayer's op: F.conv2d with the layer's geometry
    else:
        return False
    return geometry == _POINTWISE and module.weight.shape[2:] == (1, 1) and module.bias is not None


_POINTWISE = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}  # a 1x1 product over the pixels


def _one_matmul(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """F.conv2d(x, w_i, b_i) for every i as one matmul of the pixels (B*H*W, C) with the stacked weights:
    maps (B, C_i, H, W), views of one (B, H, W, sum C_i) output: channels innermost, as the attention reads them."""
    batch, channels, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)
    out = F.linear(pixels, torch.cat([w.flatten(1) for w in weights]), torch.cat(biases))
    out = out.view(batch, height, width, -1).permute(0, 3, 1, 2)
    return tuple(out.split([w.shape[0] for w in weights], dim=1))


class AttentionCore(nn.Module):
    """softmax(q^T k / sqrt(c)) applied to v, for (B, C, H, W) maps; parameter-free."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).transpose(1, 2)  # (B, HW, C)
        k = k.reshape(b, c, hh * ww).transpose(1, 2)
        v = v.reshape(b, c, hh * ww).transpose(1, 2)
        out = token_attention(q, k, v)  # (B, HW, C); scale 1/sqrt(C) as published
        return out.transpose(1, 2).reshape(b, c, hh, ww)


def token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head scaled dot-product attention over (B, L, C) tokens. In bf16/fp16 the tokens go in as one
    head of a 4-D batch, so the fused (flash) kernels qualify: for 3-D inputs only the math kernel runs, and it
    computes in float32. Float32 inputs keep the math kernel, the reference arithmetic."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    return F.scaled_dot_product_attention(q, k, v)


# The published up path passes `split` to the blocks of levels 0-3 only (`i_level < 4`): all of CIFAR-10's
# four levels, not levels 4 and 5 of the six-level LSUN models.
_SPLIT_LEVELS = 4


class _Level(nn.Module):
    """One resolution level; a plain container so state_dict keys read down.{i}.block.{j}..."""


class DDIMUNet(nn.Module):
    """The official DDIM `Model` (type 'simple'). `forward(x, t)` predicts eps."""

    def __init__(self, config: DDIMUNetConfig):
        super().__init__()
        self.config = config
        ch, mult = config.ch, config.ch_mult
        self.temb_ch = ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, stride=1, padding=1)

        in_mult = (1,) + mult
        res = config.image_size
        self.down = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            down = _Level()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * m
            for _ in range(config.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, self.temb_ch, config.dropout))
                block_in = block_out
                if res in config.attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                down.downsample = Downsample(block_in, config.resamp_with_conv)
                res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, config.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, config.dropout)

        ups: list[_Level] = []
        self._concat_splits: dict[str, int] = {}
        for level in reversed(range(len(mult))):
            up = _Level()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * mult[level]
            for i in range(config.num_res_blocks + 1):
                skip_in = ch * (in_mult[level] if i == config.num_res_blocks else mult[level])
                if level < _SPLIT_LEVELS and block_in + skip_in != block_out:  # the block has a nin_shortcut
                    self._concat_splits[f"up.{level}.block.{i}.nin_shortcut"] = block_in
                up.block.append(ResnetBlock(block_in + skip_in, block_out, self.temb_ch, config.dropout))
                block_in = block_out
                if res in config.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in, config.resamp_with_conv)
                res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, stride=1, padding=1)

    def concat_splits(self) -> dict[str, int]:
        """The layers the published split shortcut quantizes in two halves: name -> channels of h.

        As the published Q-Diffusion/MoDiff code: only the 1x1 `nin_shortcut` of the up-path blocks, whose
        input is cat([h, skip]) itself, and only at levels below 4. `conv1` reads
        swish(norm1(cat([h, skip]))) and is quantized whole.
        """
        return dict(self._concat_splits)

    def attention_cores(self) -> list[str]:
        """The parameter-free attention matmuls (`AttentionCore`) by name: what attention quantization wraps
        and BOP counting counts."""
        return [name for name, module in self.named_modules() if isinstance(module, AttentionCore)]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            raise ValueError(f"expected images of {size}x{size}, got {tuple(x.shape[-2:])}")
        temb = timestep_embedding(t, self.config.ch).to(x.dtype)
        temb = self.temb.dense[1](swish(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(hs[-1], temb)
                if len(down.attn):
                    h = down.attn[i](h)
                hs.append(h)
            if level != len(self.down) - 1:
                hs.append(down.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)

        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


_MODEL_KEYS = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels", "resamp_with_conv"}
_IGNORED_MODEL_KEYS = {"type", "var_type", "ema_rate", "ema"}


def unet_config_from_yaml(config: Mapping[str, Any]) -> DDIMUNetConfig:
    """Typed config from a parsed official DDIM YAML (sections `data`, `model`, `diffusion`)."""
    if "model" not in config or "data" not in config:
        raise ValueError(
            f"an official DDIM config needs 'model' and 'data' sections, got sections {sorted(config)}"
        )
    model = dict(config["model"])
    model_type = model.get("type", "simple")
    if model_type != "simple":
        raise ValueError(f"only model.type 'simple' is supported, got {model_type!r}")
    unknown = set(model) - _MODEL_KEYS - _IGNORED_MODEL_KEYS
    if unknown:
        raise ValueError(f"unknown keys in the model section: {sorted(unknown)}; expected {sorted(_MODEL_KEYS)}")
    missing = _MODEL_KEYS - set(model) - {"resamp_with_conv", "dropout"}
    if missing:
        raise ValueError(f"the model section lacks {sorted(missing)}")
    kwargs = {k: model[k] for k in _MODEL_KEYS if k in model}
    return DDIMUNetConfig(**kwargs, image_size=int(config["data"]["image_size"]))


def ddim_unet_from_config(config: Mapping[str, Any]) -> DDIMUNet:
    """Build the UNet from a parsed official DDIM YAML (sections data/model/diffusion)."""
    return DDIMUNet(unet_config_from_yaml(config))
