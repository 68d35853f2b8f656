"""CompVis latent-diffusion networks: checkpoint layouts, config/checkpoint plumbing, and forward passes
against hand-computed references."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modiff.models.ddim_unet import AttentionCore
from modiff.models.ldm import (
    AutoencoderKL,
    Decoder,
    DiagonalGaussianDistribution,
    Encoder,
    LDMInfo,
    UNetModel,
    VectorQuantizer,
    VQModel,
    compvis_scale_factor,
    compvis_state_dict_split,
    ldm_modules_from_config,
    timestep_embedding,
)
from modiff.models.ldm_unet import AttentionBlock, GroupNorm32, ResBlock, attention_heads

LAYOUTS = json.loads((Path(__file__).parents[1] / "fixtures" / "ldm_checkpoint_layouts.json").read_text())

TINY_UNET: dict[str, Any] = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                                 attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=2)
TINY_DD: dict[str, Any] = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                               ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def compvis_yaml(layout: dict[str, Any]) -> dict[str, Any]:
    """The CompVis LDM YAML (as parsed) that a fixture's condensed `config` entry describes."""
    c = layout["config"]
    first_stage = {**c["first_stage"], "lossconfig": {"target": "torch.nn.Identity"}}
    params = {
        "linear_start": c["linear_start"], "linear_end": c["linear_end"], "timesteps": c["timesteps"],
        "image_size": c["latent_image_size"], "channels": c["latent_channels"], "scale_by_std": c["scale_by_std"],
        "cond_stage_config": "__is_unconditional__", "first_stage_key": "image",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": c["unet"]},
        "first_stage_config": {"target": f"ldm.models.autoencoder.{c['first_stage_target']}", "params": first_stage},
    }
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def perturbed(module: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Eval-mode module with every parameter shifted by noise, so zero-initialised convs are not trivial."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(scale * torch.randn_like(p))
    return module.eval()


def tiny_unet(seed: int = 0, **overrides: Any) -> UNetModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = UNetModel(**{**TINY_UNET, **overrides})
    return perturbed(net, seed)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# 1. Layouts of the LSUN checkpoints, and checkpoint plumbing
# --------------------------------------------------------------------------------------------------


def _expected(layout: dict[str, Any], prefix: str) -> dict[str, list[int]]:
    return {k[len(prefix):]: list(v) for k, v in layout["state_dict"].items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", ["ldm-lsun-churches256-kl-f8", "ldm-lsun-beds256-vq-f4"])
def test_layout_matches_lsun_checkpoint(name: str) -> None:
    """Keys (in order), shapes and parameter count of UNet and first stage equal the checkpoint's."""
    layout = LAYOUTS[name]
    unet, first_stage, info = ldm_modules_from_config(compvis_yaml(layout), device="meta")
    fake = {k: torch.empty(shape, device="meta") for k, shape in layout["state_dict"].items()}
    unet_state, first_state = compvis_state_dict_split(fake, use_ema=False)
    for module, expected in ((unet, unet_state), (first_stage, first_state)):
        got = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert list(got) == list(expected)
        assert got == {k: list(v.shape) for k, v in expected.items()}
    assert sum(p.numel() for p in unet.parameters()) == layout["unet_parameters"]
    c = layout["config"]
    assert info.sample_shape == (c["latent_channels"], c["latent_image_size"], c["latent_image_size"])
    assert (info.first_stage, info.scale_by_std) == (("kl", True) if "kl" in name else ("vq", False))
    assert isinstance(first_stage, AutoencoderKL if "kl" in name else VQModel)


def test_state_dict_split_takes_ema_weights_by_litema_names() -> None:
    """use_ema reads model_ema.diffusion_model<key without dots>; missing EMA weights are an error."""
    w, b = torch.ones(2, 2), torch.zeros(2)
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": w, "model.diffusion_model.out.2.bias": b,
        "first_stage_model.quant_conv.weight": w, "betas": torch.ones(3), "scale_factor": torch.tensor(0.25),
        "model_ema.diffusion_modelinput_blocks00weight": 2 * w, "model_ema.diffusion_modelout2bias": b + 3,
        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
    }
    raw, first = compvis_state_dict_split(state, use_ema=False)
    assert set(raw) == {"input_blocks.0.0.weight", "out.2.bias"} and set(first) == {"quant_conv.weight"}
    assert torch.equal(raw["input_blocks.0.0.weight"], w)
    ema, _ = compvis_state_dict_split(state, use_ema=True)
    assert torch.equal(ema["input_blocks.0.0.weight"], 2 * w) and torch.equal(ema["out.2.bias"], b + 3)

    no_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    with pytest.raises(ValueError, match="no EMA weights"):
        compvis_state_dict_split(no_ema, use_ema=True)
    partial = {k: v for k, v in state.items() if k != "model_ema.diffusion_modelout2bias"}
    with pytest.raises(ValueError, match="1 EMA tensors are missing.*diffusion_modelout2bias"):
        compvis_state_dict_split(partial, use_ema=True)
    with pytest.raises(ValueError, match="ckpt\\['state_dict'\\]"):
        compvis_state_dict_split({"state_dict": state}, use_ema=False)


def test_scale_factor_comes_from_the_checkpoint_when_scale_by_std() -> None:
    base = dict(image_size=4, channels=3, timesteps=1000, beta_schedule="linear", linear_start=0.0015,
                linear_end=0.0195, parameterization="eps", scale_factor=1.0, first_stage="kl")
    state = {"scale_factor": torch.tensor(0.22765929)}
    assert compvis_scale_factor(state, LDMInfo(scale_by_std=True, **base)) == pytest.approx(0.22765929)
    assert compvis_scale_factor(state, LDMInfo(scale_by_std=False, **base)) == 1.0
    with pytest.raises(ValueError, match="no 'scale_factor' buffer"):
        compvis_scale_factor({}, LDMInfo(scale_by_std=True, **base))


def test_config_errors_name_the_problem() -> None:
    yaml = compvis_yaml(LAYOUTS["ldm-lsun-churches256-kl-f8"])
    params = yaml["model"]["params"]
    first_stage = params["first_stage_config"]
    cases = [
        ({"cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder"}}, "only unconditional"),
        ({"first_stage_config": {"target": "ldm.models.autoencoder.VQModel", "params": {}}}, "VQModelInterface"),
        ({"first_stage_config": {**first_stage, "params": {**first_stage["params"], "typo": 1}}},
         "unknown \\['typo'\\]"),
        ({"channels": 3}, "channels=3"),
    ]
    for change, message in cases:
        bad = {"model": {**yaml["model"], "params": {**params, **change}}}
        with pytest.raises(ValueError, match=message):
            ldm_modules_from_config(bad, device="meta")
    with pytest.raises(ValueError, match="model.params"):
        ldm_modules_from_config({"data": {}})


@pytest.mark.parametrize("option, message", [
    ({"num_classes": 10}, "class-conditional"),
    ({"use_spatial_transformer": True, "context_dim": 8}, "cross-attention"),
    ({"n_embed": 16}, "codebook-id"), ({"use_fp16": True}, "use_fp16"), ({"dims": 1}, "dims=1"),
    ({"num_heads": -1}, "num_heads or num_head_channels"), ({"channel_mult": [2, 2]}, "start with 1"),
    ({"num_heads": -1, "num_head_channels": 24}, "num_head_channels=24"),
])
def test_unsupported_unet_options_raise(option: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetModel(**{**TINY_UNET, **option})


# --------------------------------------------------------------------------------------------------
# 2. UNet pieces against their formulas
# --------------------------------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin() -> None:
    """dim 4: f = (1, 10000^-1/2); emb = [cos(t f), sin(t f)]; odd dims get a zero column."""
    t = torch.tensor([0.0, 1.0, 250.0])
    emb = timestep_embedding(t, 4)
    for row, tv in zip(emb, t.tolist()):
        expected = [math.cos(tv), math.cos(tv * 0.01), math.sin(tv), math.sin(tv * 0.01)]
        assert row.tolist() == pytest.approx(expected, abs=1e-5)
    odd = timestep_embedding(torch.tensor([3]), 5)
    assert odd.shape == (1, 5) and odd[0, 4] == 0 and odd[0, :4].tolist() == pytest.approx(
        timestep_embedding(torch.tensor([3]), 4)[0].tolist())


def test_groupnorm32_computes_in_float32() -> None:
    norm = GroupNorm32(32, 64)
    x = (torch.randn(2, 64, 3, 3, generator=torch.Generator().manual_seed(0)) * 100 + 1000).half()
    out = norm(x)
    assert out.dtype == torch.float16
    reference = F.group_norm(x.float(), 32, eps=1e-5)
    assert torch.allclose(out.float(), reference, atol=2e-3)  # fp16 output rounding only


def _explicit_legacy_attention(block: AttentionBlock, x: torch.Tensor, heads: int) -> torch.Tensor:
    """x + proj_out(attn) with heads split before q/k/v and softmax(q^T k / sqrt(d)) v, via einsum."""
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, hh * ww)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0], block.norm(flat)) + block.qkv.bias[None, :, None]
    d = c // heads
    qkv = qkv.reshape(b, heads, 3 * d, hh * ww)
    q, k, v = qkv[:, :, :d], qkv[:, :, d:2 * d], qkv[:, :, 2 * d:]
    weights = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bhts,bhds->bhdt", weights, v).reshape(b, c, hh * ww)
    out = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0], a) + block.proj_out.bias[None, :, None]
    return (flat + out).reshape(b, c, hh, ww)


def test_attention_block_legacy_order_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    block = perturbed(AttentionBlock(64, num_heads=4), scale=0.3)
    x = torch.randn(2, 64, 3, 5)
    expected = _explicit_legacy_attention(block, x, heads=4)
    assert torch.allclose(block(x), expected, atol=1e-5)
    assert not torch.allclose(block(x), x, atol=1e-3)  # the attention branch is not trivial
    new = AttentionBlock(64, num_heads=4, use_new_attention_order=True)
    new.load_state_dict(block.state_dict())
    out_new = new.eval()(x)
    assert out_new.shape == x.shape and torch.isfinite(out_new).all()
    assert not torch.allclose(out_new, expected, atol=1e-3)  # same weights, different qkv reading
    cores = [m for m in block.modules() if isinstance(m, AttentionCore)]
    assert len(cores) == 1  # the matmuls live in one module the quantizer can swap


def test_attention_heads_follow_compvis_resolution() -> None:
    assert attention_heads(224, num_heads=-1, num_head_channels=32, legacy=True) == 7
    assert attention_heads(384, num_heads=8, num_head_channels=-1, legacy=True) == 8
    assert attention_heads(64, num_heads=48, num_head_channels=-1, legacy=False) == 64  # via head dim 1
    with pytest.raises(ValueError, match="num_heads=5"):
        attention_heads(96, num_heads=5, num_head_channels=-1, legacy=False)  # head dim 19 does not divide 96
    with pytest.raises(ValueError, match="num_head_channels=24"):
        attention_heads(64, num_heads=-1, num_head_channels=24, legacy=True)


def test_resblock_scale_shift_norm_against_formula() -> None:
    """h = conv1(silu(gn(x))); [s, b] = W silu(emb); out = skip(x) + conv2(silu(gn2(h) (1 + s) + b))."""
    torch.manual_seed(1)
    block = perturbed(ResBlock(32, emb_channels=16, dropout=0.0, out_channels=64, use_scale_shift_norm=True))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    h = block.in_layers[2](F.silu(block.in_layers[0](x)))
    e = block.emb_layers[1](F.silu(emb))
    scale, shift = e[:, :64, None, None], e[:, 64:, None, None]
    h = block.out_layers[3](F.silu(block.out_layers[0](h) * (1 + scale) + shift))
    assert torch.allclose(block(x, emb), block.skip_connection(x) + h, atol=1e-5)
    assert block.emb_layers[1].out_features == 128 and isinstance(block.skip_connection, nn.Conv2d)


def test_resblock_updown_resamples_both_branches() -> None:
    torch.manual_seed(2)
    x, emb = torch.randn(1, 32, 8, 8), torch.randn(1, 128)
    down = perturbed(ResBlock(32, 128, 0.0, down=True))
    up = perturbed(ResBlock(32, 128, 0.0, up=True))
    assert down(x, emb).shape == (1, 32, 4, 4) and up(x, emb).shape == (1, 32, 16, 16)
    h = down.in_layers[2](F.avg_pool2d(down.in_layers[1](down.in_layers[0](x)), 2))
    h = down.out_layers(h + down.emb_layers(emb)[:, :, None, None])
    assert torch.allclose(down(x, emb), F.avg_pool2d(x, 2) + h, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 3. Whole UNet forward passes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {},
    {"num_heads": -1, "num_head_channels": 16},
    {"use_scale_shift_norm": True, "resblock_updown": True},
    {"conv_resample": False, "num_res_blocks": 2, "attention_resolutions": [2]},
])
def test_unet_forward_shapes_and_determinism(overrides: dict[str, Any]) -> None:
    net = tiny_unet(**overrides)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    with torch.no_grad():
        eps = net(x, t)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        assert torch.equal(eps, net(x, t))
        assert torch.allclose(net(x[1:], t[1:]), eps[1:], atol=1e-5)  # samples do not interact
        assert not torch.allclose(eps, net(x, torch.tensor([500, 500])), atol=1e-4)  # t matters


def test_unet_head_options_and_qkv_order_change_the_output() -> None:
    x, t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([42])
    base = tiny_unet()
    heads = [m.num_heads for m in base.modules() if isinstance(m, AttentionBlock)]
    assert heads == [2] * 7  # 2 input, 1 middle, 4 output blocks
    by_channels = UNetModel(**{**TINY_UNET, "num_heads": -1, "num_head_channels": 16})
    assert [m.num_heads for m in by_channels.modules() if isinstance(m, AttentionBlock)] == [2, 4, 4, 4, 4, 2, 2]
    variants = {"heads4": tiny_unet(num_heads=4), "new_order": tiny_unet(use_new_attention_order=True)}
    with torch.no_grad():
        ref = base(x, t)
        for name, net in variants.items():
            net.load_state_dict(base.state_dict())
            out = net(x, t)
            assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4), name


def test_fresh_unet_is_zero_initialised_like_compvis() -> None:
    net = UNetModel(**TINY_UNET).eval()
    with torch.no_grad():
        assert torch.equal(net(torch.randn(1, 3, 8, 8), torch.tensor([5])), torch.zeros(1, 3, 8, 8))


def test_unet_concat_splits_point_at_skip_inputs() -> None:
    net = tiny_unet()
    splits = net.concat_splits()
    assert set(splits) == {f"output_blocks.{i}.0.skip_connection" for i in range(len(net.output_blocks))}
    for name, channels in splits.items():
        layer = net.get_submodule(name)
        assert isinstance(layer, nn.Conv2d) and 0 < channels < layer.in_channels


def test_unet_quantizes_with_attention_cores() -> None:
    from modiff.quant.api import quantize
    from modiff.quant.config import QuantConfig
    from modiff.quant.layers.direct import QuantAttentionCore

    net = tiny_unet()
    qnet = quantize(net, QuantConfig(quantize_attention=True, split_shortcut=True))
    assert sum(isinstance(m, QuantAttentionCore) for m in qnet.modules()) == 7
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([3, 700])
    with torch.no_grad():
        ref, out = net(x, t), qnet(x, t)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


# --------------------------------------------------------------------------------------------------
# 4. First stages
# --------------------------------------------------------------------------------------------------


def test_diagonal_gaussian_against_formulas() -> None:
    mean = torch.tensor([[[[1.0]], [[-2.0]]]])  # (1, 2, 1, 1)
    logvar = torch.tensor([[[[0.0]], [[100.0]]]])  # the second is clamped to 20
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert dist.logvar.flatten().tolist() == [0.0, 20.0]
    assert torch.equal(dist.mode(), mean)
    assert dist.std.flatten().tolist() == pytest.approx([1.0, math.exp(10.0)])
    expected_kl = 0.5 * ((1 + 1 - 1 - 0) + (4 + math.exp(20) - 1 - 20))
    assert dist.kl().item() == pytest.approx(expected_kl, rel=1e-6)
    other = DiagonalGaussianDistribution(torch.zeros(1, 4, 1, 1))
    assert torch.allclose(dist.kl(other), dist.kl())
    noise = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(7))
    sample = dist.sample(torch.Generator().manual_seed(7))
    assert torch.allclose(sample, mean + dist.std * noise)
    point = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1), deterministic=True)
    assert torch.equal(point.sample(), mean) and point.kl().tolist() == [0.0]
    nll = DiagonalGaussianDistribution(torch.zeros(1, 2, 1, 1)).nll(torch.ones(1, 1, 1, 1))
    assert nll.item() == pytest.approx(0.5 * (math.log(2 * math.pi) + 1.0))


def test_vector_quantizer_picks_the_nearest_codebook_entry() -> None:
    vq = VectorQuantizer(4, 2, beta=0.25)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    points = torch.tensor([[0.1, -0.1], [0.9, 0.3], [-0.2, 0.7], [4.0, 3.0], [0.6, 0.45], [0.45, 0.6]])
    z = points.t().reshape(1, 2, 2, 3)  # (B, e_dim, h, w), positions in row-major order
    z_q, loss, (_, _, indices) = vq(z)
    assert indices.tolist() == [0, 1, 2, 3, 1, 2]
    codes = vq.embedding.weight[torch.tensor([0, 1, 2, 3, 1, 2])]
    assert torch.allclose(z_q, codes.t().reshape(1, 2, 2, 3))
    assert loss.item() == pytest.approx(1.25 * ((codes - points) ** 2).mean().item(), rel=1e-6)
    sane = VectorQuantizer(4, 2, sane_index_shape=True)
    sane.load_state_dict(vq.state_dict())
    assert sane(z)[2][2].tolist() == [[[0, 1, 2], [3, 1, 2]]]  # (B, h, w)
    assert torch.allclose(vq.get_codebook_entry(indices, (1, 2, 3, 2)), z_q)
    with pytest.raises(ValueError, match="remap"):
        VectorQuantizer(4, 2, remap="used_codes.npy")


def test_autoencoder_kl_shapes_and_posterior() -> None:
    torch.manual_seed(5)
    ae = perturbed(AutoencoderKL(TINY_DD, embed_dim=3))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        posterior = ae.encode(x)
        moments = ae.quant_conv(ae.encoder(x))
        assert moments.shape == (2, 6, 8, 8) and torch.equal(posterior.mean, moments[:, :3])
        x_rec, post = ae(x, sample_posterior=False)
        assert x_rec.shape == x.shape and torch.allclose(x_rec, ae.decode(posterior.mode()))
        sampled, _ = ae(x, generator=torch.Generator().manual_seed(0))
        again, _ = ae(x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(sampled, again) and not torch.allclose(sampled, x_rec)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**TINY_DD, "double_z": False}, embed_dim=3)


def test_encoder_decoder_options() -> None:
    torch.manual_seed(6)
    dd = {**TINY_DD, "attn_resolutions": [16, 8]}
    enc, dec = perturbed(Encoder(**dd)), perturbed(Decoder(**dd, give_pre_end=False, tanh_out=True))
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in enc.modules()) == 4 * 3 + 1
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 16, 16)).shape == (1, 8, 8, 8)
        out = dec(z)
        assert out.shape == (1, 3, 16, 16) and out.abs().max() <= 1
        pre = Decoder(**dd, give_pre_end=True)
        pre.load_state_dict(dec.state_dict())
        assert pre.eval()(z).shape == (1, 32, 16, 16)
    plain = Encoder(**{**dd, "attn_type": "none"})
    assert not any(type(m).__name__ == "AttnBlock" for m in plain.modules())
    with pytest.raises(ValueError, match="attn_type 'linear'"):
        Encoder(**{**dd, "attn_type": "linear"})
    with pytest.raises(ValueError, match="not divisible"):
        Encoder(**{**dd, "resolution": 15})


def test_vq_model_decode_quantizes_unless_forced() -> None:
    torch.manual_seed(8)
    vq = perturbed(VQModel({**TINY_DD, "double_z": False}, n_embed=16, embed_dim=3))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        h = vq.encode(x)
        assert h.shape == (1, 3, 8, 8)
        quant, _, (_, _, indices) = vq.quantize(h)
        assert torch.allclose(quant, vq.quantize.get_codebook_entry(indices, (1, 8, 8, 3)))
        assert torch.equal(vq.decode(h), vq.decode(quant, force_not_quantize=True))
        assert not torch.allclose(vq.decode(h), vq.decode(h, force_not_quantize=True))
        x_rec, loss, ind = vq(x, return_pred_indices=True)
        assert torch.equal(x_rec, vq.decode(h)) and torch.equal(ind, indices) and loss.ndim == 0
