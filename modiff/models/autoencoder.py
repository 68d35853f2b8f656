"""First-stage autoencoders of the CompVis latent-diffusion models: KL (AutoencoderKL) and VQ (VQModel).

Module names, shapes and forward passes follow CompVis `ldm.modules.diffusionmodules.model`
(Encoder/Decoder), `ldm.models.autoencoder` and taming's `VectorQuantizer2`, so the
`first_stage_model.*` weights of the LDM checkpoints load strictly and decode identically.
Training losses (LPIPS, discriminator) are not part of these modules; the first stage stays in full
precision, so its attention is computed inline (not in a quantizable `AttentionCore`).

Notation: x images (B, C, H, W) in [-1, 1]; z latents (B, z_channels, H / f, W / f), f = 2^(len(ch_mult)-1).
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Union

import torch
from torch import nn

from modiff.models.ddim_unet import Downsample, Upsample, group_norm, swish, token_attention

__all__ = ["Encoder", "Decoder", "DiagonalGaussianDistribution", "AutoencoderKL", "VectorQuantizer", "VQModel"]

AttnType = Literal["vanilla", "none"]
_ATTN_TYPES: tuple[str, ...] = ("vanilla", "none")


class ResnetBlock(nn.Module):
    """The autoencoder's residual block: no timestep input, 1x1 `nin_shortcut` when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj_out convs; softmax(q^T k / sqrt(C)) v."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (conv(h).reshape(b, c, hh * ww).transpose(1, 2) for conv in (self.q, self.k, self.v))
        out = token_attention(q, k, v)  # (B, HW, C)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


def make_attn(channels: int, attn_type: str) -> nn.Module:
    if attn_type not in _ATTN_TYPES:
        raise ValueError(f"attn_type {attn_type!r} is not supported; allowed: {_ATTN_TYPES} "
                         "(CompVis 'linear' attention is not implemented)")
    return AttnBlock(channels) if attn_type == "vanilla" else nn.Identity()


def _check_ddconfig(ch: int, ch_mult: Sequence[int], resolution: int, use_linear_attn: bool) -> tuple[int, ...]:
    mult = tuple(int(m) for m in ch_mult)
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
    if ch % 32:
        raise ValueError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {ch}")
    if resolution % 2 ** (len(mult) - 1):
        raise ValueError(f"resolution {resolution} is not divisible by 2**{len(mult) - 1} (len(ch_mult) - 1)")
    if use_linear_attn:
        raise ValueError("use_linear_attn=True is not supported; use attn_type 'vanilla' or 'none'")
    return mult


class _Level(nn.Module):
    """One resolution level; a plain container so keys read down.{i}.block.{j} / up.{i}.attn.{j}."""


class _MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, attn_type: str):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = make_attn(channels, attn_type)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> moments (B, 2 z_channels if double_z else z_channels, H / f, W / f).

    Takes a CompVis `ddconfig`; the decoder-only keys (out_ch, give_pre_end, tanh_out) are accepted
    and unused, since CompVis passes one ddconfig to both halves.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: AttnType = "vanilla", give_pre_end: bool = False,
                 tanh_out: bool = False):
        super().__init__()
        mult = _check_ddconfig(ch, ch_mult, resolution, use_linear_attn)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult, res = (1,) + mult, resolution
        self.down = nn.ModuleList()
        for level, m in enumerate(mult):
            down = _Level()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_mult[level]
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * m, dropout))
                block_in = ch * m
                if res in attn_resolutions:
                    down.attn.append(make_attn(block_in, attn_type))
            if level != len(mult) - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(down)
        self.mid = _MidBlock(block_in, dropout, attn_type)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, H / f, W / f) -> x (B, out_ch, H, W); `give_pre_end` returns the features
    before norm_out/conv_out, `tanh_out` squashes the output. Encoder-only keys are accepted, unused."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, use_linear_attn: bool = False, attn_type: AttnType = "vanilla",
                 double_z: bool = True):
        super().__init__()
        mult = _check_ddconfig(ch, ch_mult, resolution, use_linear_attn)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * mult[-1]
        res = resolution // 2 ** (len(mult) - 1)
        self.z_shape = (1, z_channels, res, res)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _MidBlock(block_in, dropout, attn_type)
        ups: list[_Level] = []
        for level in reversed(range(len(mult))):
            up = _Level()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * mult[level], dropout))
                block_in = ch * mult[level]
                if res in attn_resolutions:
                    up.attn.append(make_attn(block_in, attn_type))
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(swish(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """The KL posterior N(mean, exp(logvar)) from moments (B, 2C, h, w) = [mean, logvar] on channels.

    logvar is clamped to [-30, 20] as in CompVis; `deterministic` makes it a point mass at the mean.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * n, n ~ N(0, I) drawn from `generator` (on its device) when one is given."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self, other: Optional[DiagonalGaussianDistribution] = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, h, w); other defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log N(sample; mean, var) per sample, summed over (C, h, w)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        log_two_pi = math.log(2.0 * math.pi)
        dims = list(range(1, self.mean.ndim))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean) ** 2 / self.var, dim=dims)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """CompVis AutoencoderKL: encode(x) -> posterior over z (B, embed_dim, H/f, W/f); decode(z) -> x."""

    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig['double_z']=True (the encoder outputs mean and logvar)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2: nearest codebook entry by squared distance, straight-through gradient.

    forward(z) -> (z_q, loss, (None, None, indices)); legacy=True weighs the commitment term
    ||sg(z_q) - z||^2 by 1 and the codebook term ||z_q - sg(z)||^2 by beta (the published bug, kept).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, remap: Optional[str] = None,
                 unknown_index: str = "random", sane_index_shape: bool = False, legacy: bool = True):
        super().__init__()
        if remap is not None:
            raise ValueError(f"codebook remapping is not supported (got remap={remap!r}); use remap=None")
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the codebook rows closest to z_flat (N, e_dim): argmin |z|^2 + |e|^2 - 2 z.e."""
        e = self.embedding.weight
        d = (z_flat**2).sum(dim=1, keepdim=True) + (e**2).sum(dim=1) - 2 * z_flat @ e.t()
        return torch.argmin(d, dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, e_dim)
        indices = self.nearest(z.view(-1, self.e_dim))
        z_q = self.embedding(indices).view(z.shape)
        commitment, codebook = torch.mean((z_q.detach() - z) ** 2), torch.mean((z_q - z.detach()) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        z_q = z + (z_q - z).detach()  # the same arithmetic as CompVis, so decodes match bit for bit
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]]) -> torch.Tensor:
        """Codebook vectors of `indices`; with shape (B, h, w, e_dim), returned as (B, e_dim, h, w)."""
        z_q = self.embedding(indices.reshape(-1))
        if shape is None:
            return z_q
        return z_q.view(*shape).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    """CompVis VQModelInterface (the LDM first stage): encode(x) -> h before quantization (after
    quant_conv); decode(h) quantizes h with the codebook first unless `force_not_quantize`."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, sane_index_shape: bool = False):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = int(ddconfig["z_channels"])
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)  # registered first: the checkpoints' key order
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, sane_index_shape=sane_index_shape)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.n_embed, self.embed_dim = n_embed, embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor, return_pred_indices: bool = False
                ) -> Union[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Training pass of CompVis VQModel: (x_rec, codebook loss[, indices])."""
        quant, loss, (_, _, indices) = self.quantize(self.encode(x))
        x_rec = self.decode(quant, force_not_quantize=True)
        return (x_rec, loss, indices) if return_pred_indices else (x_rec, loss)
