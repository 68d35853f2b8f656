"""The latent UNet of the CompVis latent-diffusion models (`openaimodel.UNetModel`).

Module names, parameter shapes, initialisation and the forward pass follow the CompVis code, so that
the `model.diffusion_model.*` weights of its checkpoints load strictly and give the same outputs:
timestep embedding with cos first then sin (spacing log(10000) / half), GroupNorm(32, eps=1e-5)
computed in float32, ResBlocks with optional scale-shift (FiLM) norm and optional up/down sampling,
multi-head attention blocks with the legacy qkv ordering (heads split before q/k/v) or the new one.

All Conv/Linear layers are plain `nn.Conv2d` / `nn.Conv1d` / `nn.Linear` modules, and the attention
matmuls run in `AttentionCore` (shared with the DDIM UNet), so the quantizer finds and wraps them.

Shapes: x (B, C_in, H, W), timesteps (B,) -> eps (B, C_out, H, W).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modiff.models.ddim_unet import AttentionCore, fast_path_input, per_channel_group_norm

__all__ = ["UNetModel", "ResBlock", "AttentionBlock", "QKVAttentionLegacy", "QKVAttention", "GroupNorm32",
           "timestep_embedding"]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """CompVis sinusoidal embedding (B,) -> (B, dim): [cos(t f), sin(t f)], f_i = max_period^(-i / half).

    Differs from the DDIM embedding (sin first, spacing 1 / (half - 1)); both are needed.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (batch,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None].to(timesteps.device)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as CompVis does (fp16-safe statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path_input(x) and self.affine:
            return per_channel_group_norm(x, self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    if channels % 32:
        raise ValueError(f"GroupNorm with 32 groups needs channels divisible by 32, got {channels}")
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise the parameters (CompVis init of every residual branch's last layer)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv if `use_conv` (parameters under `conv`)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (padding 1) if `use_conv`, else 2x2 average pooling; both under `op`."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """norm-SiLU-conv, timestep injection (add, or scale-shift after norm), norm-SiLU-dropout-conv, skip.

    With `up`/`down`, the block resamples both branches (without parameters) between the first
    norm-SiLU and its conv, as in the CompVis `resblock_updown` models.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, use_checkpoint: bool = False, up: bool = False,
                 down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on a fused qkv (B, heads * 3 * ch, T): heads split first, then q, k, v."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.core = AttentionCore()

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)
        return q, k, v

    def forward(self, qkv: torch.Tensor, spatial: tuple[int, int]) -> torch.Tensor:
        """(B, 3 * heads * ch, H * W) -> (B, heads * ch, H * W); softmax(q^T k / sqrt(ch)) per head."""
        bs, _, length = qkv.shape
        q, k, v = (t.reshape(t.shape[0], t.shape[1], *spatial) for t in self.split(qkv))
        return self.core(q, k, v).reshape(bs, -1, length)  # core: (B * heads, ch, H, W) maps


class QKVAttention(QKVAttentionLegacy):
    """The new order: q, k, v split first (each (B, heads * ch, T)), then heads."""

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        return tuple(t.reshape(bs * self.n_heads, ch, length) for t in (q, k, v))  # type: ignore[return-value]


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(norm(x)))) over the H * W positions; qkv and proj_out are 1x1 Conv1d."""

    def __init__(self, channels: int, num_heads: int, use_new_attention_order: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        if num_heads <= 0 or channels % num_heads:
            raise ValueError(f"attention on {channels} channels needs a head count dividing it, got {num_heads}")
        self.num_heads, self.use_checkpoint = num_heads, use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(num_heads) if use_new_attention_order else QKVAttentionLegacy(num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        h = self.proj_out(self.attention(self.qkv(self.norm(x)), (hh, ww)))
        return (x + h).reshape(b, c, hh, ww)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def attention_heads(channels: int, num_heads: int, num_head_channels: int, legacy: bool) -> int:
    """Heads of an attention block on `channels`, resolved as the CompVis constructor does.

    With `num_head_channels` set, heads = channels // num_head_channels. Otherwise the legacy models
    use `num_heads` as given, and `legacy=False` goes through dim_head = channels // num_heads first.
    """
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise ValueError(f"attention on {channels} channels: not divisible by "
                             f"num_head_channels={num_head_channels}")
        return channels // num_head_channels
    if legacy:
        return num_heads
    head_dim = channels // num_heads
    if head_dim == 0 or channels % head_dim:
        raise ValueError(f"attention on {channels} channels cannot have num_heads={num_heads}")
    return channels // head_dim


def _check_supported(dims: int, num_classes: Optional[int], use_fp16: bool, use_spatial_transformer: bool,
                     context_dim: object, n_embed: Optional[int], num_heads: int, num_head_channels: int) -> None:
    """Reject the CompVis options this port does not implement, rather than silently ignoring them."""
    problems = [
        (dims != 2, f"only 2-D images are supported (dims=2), got dims={dims}"),
        (num_classes is not None, f"class-conditional UNets are not supported, got num_classes={num_classes}; "
                                  "use num_classes=None"),
        (use_fp16, "use_fp16=True is not supported; cast the model with .half() or use torch.autocast instead"),
        (use_spatial_transformer or context_dim is not None,
         f"cross-attention is not supported (got use_spatial_transformer={use_spatial_transformer}, "
         f"context_dim={context_dim}); only unconditional LDMs are"),
        (n_embed is not None, f"codebook-id prediction is not supported, got n_embed={n_embed}; use n_embed=None"),
        (num_heads == -1 and num_head_channels == -1, "set num_heads or num_head_channels (both are -1)"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(f"UNetModel: {message}")


class UNetModel(nn.Module):
    """The CompVis `openaimodel.UNetModel`, built from the `params` of a `unet_config`; forward(x, t) -> eps.

    `attention_resolutions` holds downsampling rates (1 = input resolution). Only the unconditional
    2-D model is implemented; the other options raise a ValueError.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Optional[int] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: Optional[int] = None, n_embed: Optional[int] = None,
                 legacy: bool = True):
        super().__init__()
        _check_supported(dims, num_classes, use_fp16, use_spatial_transformer, context_dim, n_embed,
                         num_heads, num_head_channels)
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or channel_mult[0] != 1:
            raise ValueError(f"channel_mult must start with 1 (the CompVis output conv reads model_channels), "
                             f"got {channel_mult}")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels, self.num_res_blocks, self.channel_mult = model_channels, num_res_blocks, channel_mult
        self.attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self._heads = dict(num_heads=num_heads, num_head_channels=num_head_channels, legacy=legacy)
        self._heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self._block = dict(emb_channels=4 * model_channels, dropout=dropout, use_checkpoint=use_checkpoint,
                           use_scale_shift_norm=use_scale_shift_norm)
        self._attn = dict(use_new_attention_order=use_new_attention_order, use_checkpoint=use_checkpoint)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, 4 * model_channels), nn.SiLU(),
                                        nn.Linear(4 * model_channels, 4 * model_channels))
        skip_channels = self._build_input_blocks(conv_resample, resblock_updown)
        ch = skip_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, **self._block), self._attention(ch, up=False), ResBlock(ch, **self._block))
        self._concat_splits: dict[str, int] = {}
        ch = self._build_output_blocks(skip_channels, conv_resample, resblock_updown)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def _attention(self, ch: int, up: bool) -> AttentionBlock:
        heads = dict(self._heads)
        if up and heads["num_head_channels"] == -1 and heads["legacy"]:
            heads["num_heads"] = self._heads_up  # only the legacy path honours num_heads_upsample
        return AttentionBlock(ch, attention_heads(ch, **heads), **self._attn)

    def _build_input_blocks(self, conv_resample: bool, resblock_updown: bool) -> list[int]:
        """input_blocks.{i}: conv_in, then per level num_res_blocks x (ResBlock [+ attention]) and a
        downsampler. Returns the channels of each block's output (the skip connections)."""
        mc = self.model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(self.in_channels, mc, 3, padding=1))])
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, out_channels=mult * mc, **self._block)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, up=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = ResBlock(ch, down=True, **self._block) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        return skip_channels

    def _build_output_blocks(self, skip_channels: list[int], conv_resample: bool, resblock_updown: bool) -> int:
        """output_blocks.{i}: per level (from the lowest resolution) num_res_blocks + 1 x
        (ResBlock on cat([h, skip]) [+ attention]) and an upsampler after the last. Returns channels."""
        mc, ch = self.model_channels, skip_channels[-1]
        skips = list(skip_channels)
        ds = 2 ** (len(self.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                skip = skips.pop()
                if ch + skip != mc * mult:  # the skip connection is a conv, not the identity
                    self._concat_splits[f"output_blocks.{len(self.output_blocks)}.0.skip_connection"] = ch
                layers: list[nn.Module] = [ResBlock(ch + skip, out_channels=mc * mult, **self._block)]
                ch = mc * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, up=True))
                if level and i == self.num_res_blocks:
                    up = ResBlock(ch, up=True, **self._block) if resblock_updown else Upsample(ch, conv_resample)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def concat_splits(self) -> dict[str, int]:
        """The layers the published split shortcut quantizes in two halves: name -> channels of h.

        As the published Q-Diffusion/MoDiff code: only the `skip_connection` conv of the output-path
        ResBlocks, whose input is cat([h, skip]) itself; `in_layers.2` reads SiLU(GroupNorm(cat([h, skip])))
        and is quantized whole.
        """
        return dict(self._concat_splits)

    def attention_cores(self) -> list[str]:
        """The parameter-free attention matmuls (`AttentionCore`) by name: what attention quantization wraps
        and BOP counting counts."""
        return [name for name, module in self.named_modules() if isinstance(module, AttentionCore)]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), timesteps (B,) -> eps (B, C_out, H, W)."""
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.ndim != 4 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"expected (B, C, H, W) with H and W divisible by {factor}, got {tuple(x.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
