"""The official DDIM UNet: checkpoint layouts, strict loading, and the forward pass against references."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import modiff
from modiff.models import DDIMUNet, DDIMUNetConfig, ddim_unet_from_config
from modiff.models.ddim_unet import AttentionCore, AttnBlock, Downsample, Upsample, timestep_embedding

from conftest import TINY, official_yaml, tiny_net

LAYOUTS = json.loads((Path(__file__).parents[1] / "fixtures" / "ddim_checkpoint_layouts.json").read_text())


# --------------------------------------------------------------------------------------------------
# 1. Layouts of the official checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim-cifar10", "ddim-church", "ddim-bedroom", "ddim-celeba"])
def test_layout_matches_official_checkpoint(name: str) -> None:
    """Keys (in order), shapes and parameter count equal the official checkpoint's layout."""
    layout = LAYOUTS[name]
    with torch.device("meta"):
        net = ddim_unet_from_config({"model": layout["model_config"], "data": layout["data"], "diffusion": layout["diffusion"]})
    state = net.state_dict()
    expected = {k: list(v) for k, v in layout["state_dict"].items()}
    assert set(state) == set(expected), (
        f"missing: {sorted(set(expected) - set(state))[:5]}, unexpected: {sorted(set(state) - set(expected))[:5]}"
    )
    assert list(state) == list(expected), "same keys, different order"
    wrong = {k: (list(v.shape), expected[k]) for k, v in state.items() if list(v.shape) != expected[k]}
    assert not wrong
    assert sum(p.numel() for p in net.parameters()) == layout["num_parameters"]


def test_config_validation_errors() -> None:
    """Bad model configs fail early with the offending value in the message."""
    with pytest.raises(ValueError, match="multiple of 32"):
        DDIMUNetConfig(ch=48)
    with pytest.raises(ValueError, match="not divisible"):
        DDIMUNetConfig(image_size=20, ch_mult=(1, 2, 2, 2))
    bad = official_yaml()
    bad["model"]["typo_key"] = 1
    with pytest.raises(ValueError, match="typo_key"):
        ddim_unet_from_config(bad)
    with pytest.raises(ValueError, match="'model' and 'data'"):
        ddim_unet_from_config({"model": official_yaml()["model"]})


# --------------------------------------------------------------------------------------------------
# 2. Strict loading of official-format checkpoints
# --------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, state: dict | list, config: dict | None = None) -> tuple[Path, Path]:
    ckpt, cfg = tmp_path / "model.ckpt", tmp_path / "config.yml"
    torch.save(state, ckpt)
    cfg.write_text(yaml.safe_dump(config or official_yaml()))
    return ckpt, cfg


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 1, 16, 16, generator=gen), torch.tensor([10, 900])


def test_load_official_checkpoint_gives_same_outputs(tmp_path: Path) -> None:
    """A state_dict + YAML loads strictly; the Denoiser is in eval mode and reproduces the source model."""
    src = tiny_net(1)
    ckpt, cfg = _write(tmp_path, src.state_dict())
    model = modiff.load_model(ckpt, config=cfg)
    assert isinstance(model, modiff.Denoiser) and not model.training
    assert model.sample_shape == (1, 16, 16)
    assert torch.equal(model.schedule.betas, modiff.linear_schedule().betas)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t), src(x, t))


def test_load_list_checkpoint_takes_ema_and_strips_module_prefix(tmp_path: Path) -> None:
    """[model, optimizer, epoch, step, ema] checkpoints load the EMA entry; 'module.' prefixes are stripped."""
    raw, ema = tiny_net(1), tiny_net(2)
    prefixed = {f"module.{k}": v for k, v in raw.state_dict().items()}
    ckpt, cfg = _write(tmp_path, [prefixed, {"state": {}}, 7, 1234, {f"module.{k}": v for k, v in ema.state_dict().items()}])
    model = modiff.load_model(ckpt, config=cfg)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t), ema(x, t))
        assert not torch.equal(model(x, t), raw(x, t))


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s.pop("mid.attn_1.q.weight"), "mid.attn_1.q.weight"),
        (lambda s: s.__setitem__("mid.attn_1.extra.weight", torch.zeros(1)), "mid.attn_1.extra.weight"),
        (lambda s: s.__setitem__("conv_in.weight", torch.zeros(32, 3, 3, 3)), "conv_in.weight"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_load_mismatch_names_key_and_config(tmp_path: Path, edit, key: str) -> None:
    """Missing / unexpected / wrongly shaped keys raise ValueError naming the key and showing the config."""
    state = tiny_net(1).state_dict()
    edit(state)
    ckpt, cfg = _write(tmp_path, state)
    with pytest.raises(ValueError) as err:
        modiff.load_model(ckpt, config=cfg)
    message = str(err.value)
    assert key in message
    assert "'ch': 32" in message and "'ch_mult': [1, 2]" in message


def test_load_config_that_does_not_match_checkpoint(tmp_path: Path) -> None:
    """A YAML whose ch differs from the checkpoint's is refused with a ValueError listing wrong shapes."""
    config = official_yaml()
    config["model"]["ch"] = 64
    ckpt, cfg = _write(tmp_path, tiny_net(1).state_dict(), config)
    with pytest.raises(ValueError, match="wrong shapes"):
        modiff.load_model(ckpt, config=cfg)


def test_load_model_name_errors(tmp_path: Path) -> None:
    """Unknown names list the presets; a checkpoint without its config asks for one."""
    with pytest.raises(ValueError, match="fmnist-ddim"):
        modiff.load_model("no-such-preset")
    ckpt, _ = _write(tmp_path, tiny_net(1).state_dict())
    with pytest.raises(ValueError, match="needs its YAML config"):
        modiff.load_model(ckpt)
    with pytest.raises(FileNotFoundError):
        modiff.load_model(tmp_path / "absent.ckpt", config=official_yaml())


# --------------------------------------------------------------------------------------------------
# 3. Forward pass against independent re-implementations of the official code
# --------------------------------------------------------------------------------------------------


def official_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """AttnBlock.forward of ermongroup/ddim after the q/k/v convolutions, written out with bmm."""
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)  # b, hw, c
    k = k.reshape(b, c, h * w)  # b, c, hw
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))  # b, hw (query), hw (key)
    w_ = torch.softmax(w_, dim=2)
    v = v.reshape(b, c, h * w)
    h_ = torch.bmm(v, w_.permute(0, 2, 1))  # b, c, hw (query)
    return h_.reshape(b, c, h, w)


def test_attention_core_matches_official() -> None:
    """AttentionCore equals the official bmm/softmax(dim=2) attention within 1e-5."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, 8, 6, generator=gen) for _ in range(3))
    torch.testing.assert_close(AttentionCore()(q, k, v), official_attention(q, k, v), atol=1e-5, rtol=1e-5)
    q2 = q * 4  # sharper softmax: a wrong scale or softmax axis shows clearly
    torch.testing.assert_close(AttentionCore()(q2, k, v), official_attention(q2, k, v), atol=1e-5, rtol=1e-5)


def test_attention_core_in_bfloat16_takes_a_fused_kernel_and_matches_float32() -> None:
    """In bf16 the core's tokens go in 4-D (a fused kernel may run; the 3-D math kernel computes in float32):
    the result matches the float32 attention within bf16 rounding, and keeps bf16."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 64, 8, 6, generator=gen) for _ in range(3))
    low = AttentionCore()(*(t.bfloat16() for t in (q, k, v)))
    assert low.dtype == torch.bfloat16
    reference = official_attention(*(t.bfloat16().float() for t in (q, k, v)))
    torch.testing.assert_close(low.float(), reference, atol=2e-2, rtol=2e-2)


def test_attn_block_residual_structure() -> None:
    """AttnBlock is x + proj_out(attention(q(norm x), k(norm x), v(norm x)))."""
    block = tiny_net(0).mid.attn_1
    assert isinstance(block, AttnBlock)
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(1))
    h = F.group_norm(x, 32, block.norm.weight, block.norm.bias, eps=1e-6)
    ref = x + block.proj_out(official_attention(block.q(h), block.k(h), block.v(h)))
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def _on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the fast path's projections on the CPU (its own predicate asks for CUDA, autocast and
    channels_last); GroupNorm keeps F.group_norm, whose float64 the fast path's float32 statistics would round."""
    from modiff.models.ddim_unet import GroupNorm

    monkeypatch.setattr("modiff.models.ddim_unet.fast_path_input", lambda x: True)
    monkeypatch.setattr(GroupNorm, "forward", torch.nn.GroupNorm.forward)


def test_pointwise_projections_as_one_matmul_equal_the_three_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the fast path q, k and v of an attention block run as one matmul with the stacked weights and biases:
    in float64 the same maps as the three 1x1 convolutions (views of one output), the block's
    output the same; the CPU (no fast path) calls the modules themselves."""
    from modiff.models.ddim_unet import pointwise_projections

    block = tiny_net(0).mid.attn_1.double()
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x.to(memory_format=torch.channels_last)
    convs = (block.q, block.k, block.v)
    with torch.no_grad():
        expected, reference_block = [m(x) for m in convs], block(x)
        _on_the_fast_path(monkeypatch)
        got = pointwise_projections(x, convs)
        fused_block = block(x)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.stride()[1] == 1  # channels innermost, as the attention reads tokens
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_block, reference_block, rtol=1e-12, atol=1e-12)
    assert got[0].untyped_storage().data_ptr() == got[2].untyped_storage().data_ptr()  # one matmul's output


def test_pointwise_projections_call_hooked_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook on any of the modules (a recorder, an observer) or a global module hook: every module is called,
    so the hook sees its call; so is a module that is not a plain 1x1 convolution."""
    from modiff.models.ddim_unet import pointwise_projections

    block = tiny_net(0).mid.attn_1
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(3))
    _on_the_fast_path(monkeypatch)
    seen: list[str] = []
    handle = block.k.register_forward_hook(lambda m, i, o: seen.append("k"))
    with torch.no_grad():
        pointwise_projections(x, (block.q, block.k, block.v))
        handle.remove()
        pointwise_projections(x, (block.q, block.k, block.v))
        assert seen == ["k"]
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        try:
            pointwise_projections(x, (block.q, block.k, block.v))
        finally:
            handle.remove()
        assert seen == ["k", "Conv2d", "Conv2d", "Conv2d"]
        padded = torch.nn.Conv2d(64, 64, 1, padding=1)
        before = len(seen)
        out = pointwise_projections(x, (block.q, padded))
        assert out[1].shape[-1] == 10 and len(seen) == before


def test_timestep_embedding_hand_computed() -> None:
    """dim=4, t=1: freqs [1, 1e-4] (log(10000)/(half-1) spacing) -> [sin 1, sin 1e-4, cos 1, cos 1e-4]."""
    emb = timestep_embedding(torch.tensor([1]), 4)
    expected = torch.tensor([[math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)]])
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)
    odd = timestep_embedding(torch.tensor([0, 5]), 5)
    assert odd.shape == (2, 5) and torch.equal(odd[:, -1], torch.zeros(2))
    assert torch.equal(odd[0, :4], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.tensor([[1]]), 4)


def test_downsample_pads_bottom_right_only() -> None:
    """Downsample = stride-2 3x3 conv on the input padded with one zero row/column at bottom/right."""
    down = Downsample(32, with_conv=True)
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    padded = torch.zeros(1, 32, 9, 9)
    padded[:, :, :8, :8] = x
    ref = F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    with torch.no_grad():
        out = down(x)
    assert out.shape == (1, 32, 4, 4)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(Downsample(32, with_conv=False)(x), F.avg_pool2d(x, 2))


def test_upsample_nearest_then_conv() -> None:
    """Upsample repeats each pixel 2x2 (nearest), then applies a padded 3x3 conv."""
    x = torch.arange(4.0).view(1, 1, 2, 2)
    plain = Upsample(1, with_conv=False)(x)
    assert torch.equal(plain, torch.tensor([[[[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]]]))
    up = Upsample(1, with_conv=True)
    with torch.no_grad():
        torch.testing.assert_close(up(x), F.conv2d(plain, up.conv.weight, up.conv.bias, padding=1))


def _gn_swish(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    h = F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)
    return h * torch.sigmoid(h)


def _conv(x: torch.Tensor, sd: dict, name: str, **kw) -> torch.Tensor:
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def _resnet(x: torch.Tensor, temb: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    h = _conv(_gn_swish(x, sd, f"{name}.norm1"), sd, f"{name}.conv1", padding=1)
    h = h + F.linear(temb * torch.sigmoid(temb), sd[f"{name}.temb_proj.weight"], sd[f"{name}.temb_proj.bias"])[:, :, None, None]
    h = _conv(_gn_swish(h, sd, f"{name}.norm2"), sd, f"{name}.conv2", padding=1)
    if f"{name}.nin_shortcut.weight" in sd:
        x = _conv(x, sd, f"{name}.nin_shortcut")
    return x + h


def _attn(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    h = F.group_norm(x, 32, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=1e-6)
    q, k, v = (_conv(h, sd, f"{name}.{n}") for n in "qkv")
    return x + _conv(official_attention(q, k, v), sd, f"{name}.proj_out")


def official_forward(sd: dict, config: DDIMUNetConfig, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Model.forward of ermongroup/ddim, functional, reading weights by their official state_dict names."""
    half = config.ch // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    temb = t.float()[:, None] * freqs[None, :]
    temb = torch.cat([torch.sin(temb), torch.cos(temb)], dim=1)
    temb = F.linear(temb, sd["temb.dense.0.weight"], sd["temb.dense.0.bias"])
    temb = F.linear(temb * torch.sigmoid(temb), sd["temb.dense.1.weight"], sd["temb.dense.1.bias"])
    levels, blocks = len(config.ch_mult), config.num_res_blocks
    hs = [_conv(x, sd, "conv_in", padding=1)]
    for i in range(levels):
        for j in range(blocks):
            h = _resnet(hs[-1], temb, sd, f"down.{i}.block.{j}")
            if f"down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"down.{i}.attn.{j}")
            hs.append(h)
        if i != levels - 1:
            hs.append(_conv(F.pad(hs[-1], (0, 1, 0, 1)), sd, f"down.{i}.downsample.conv", stride=2))
    h = _resnet(_attn(_resnet(hs[-1], temb, sd, "mid.block_1"), sd, "mid.attn_1"), temb, sd, "mid.block_2")
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = _resnet(torch.cat([h, hs.pop()], dim=1), temb, sd, f"up.{i}.block.{j}")
            if f"up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"up.{i}.attn.{j}")
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"up.{i}.upsample.conv", padding=1)
    assert not hs
    return _conv(_gn_swish(h, sd, "norm_out"), sd, "conv_out", padding=1)


@pytest.mark.parametrize("config", [TINY, DDIMUNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), in_channels=1, out_ch=2, image_size=16)], ids=["tiny", "3-level"])
def test_full_forward_matches_official_reference(config: DDIMUNetConfig) -> None:
    """The whole UNet equals a functional re-implementation of the official forward, keyed by official names."""
    net = tiny_net(4, config)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, config.in_channels, 16, 16, generator=gen)
    t = torch.tensor([0, 417, 999])
    with torch.no_grad():
        out = net(x, t)
        ref = official_forward(net.state_dict(), config, x, t)
    assert out.shape == (3, config.out_ch, 16, 16)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_forward_rejects_wrong_image_size() -> None:
    """A 32x32 input to a 16x16 model raises ValueError naming both sizes."""
    with pytest.raises(ValueError, match="16x16"):
        tiny_net(0)(torch.zeros(1, 1, 32, 32), torch.zeros(1))


def test_norms_and_dropout_as_published() -> None:
    """Every GroupNorm has 32 groups and eps 1e-6; dropout takes the config's rate."""
    net = DDIMUNet(DDIMUNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16, dropout=0.25))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 and m.affine for m in norms)
    drops = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.25 for m in drops)


@pytest.mark.parametrize("channels_last", [False, True])
def test_per_channel_group_norm_equals_group_norm(channels_last: bool) -> None:
    """The fast path's GroupNorm statistics from per-channel sums equal F.group_norm's (float32, a mean a
    few standard deviations from zero as after a convolution); the module takes F.group_norm itself on the
    CPU, even under autocast, so the reference arithmetic is unchanged."""
    from modiff.models.ddim_unet import GroupNorm, fast_path_input, per_channel_group_norm

    generator = torch.Generator().manual_seed(0)
    x = 2.0 + 0.5 * torch.randn(3, 64, 8, 8, generator=generator)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    norm = GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=generator))
        norm.bias.copy_(torch.randn(64, generator=generator))
    expected = F.group_norm(x, 32, norm.weight, norm.bias, 1e-6)
    got = per_channel_group_norm(x, 32, norm.weight, norm.bias, 1e-6)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_path_input(x)
        assert torch.equal(norm(x), torch.nn.GroupNorm.forward(norm, x))
    assert set(norm.state_dict()) == {"weight", "bias"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_group_norm_on_the_fast_path_equals_group_norm() -> None:
    """On CUDA under bf16 autocast with channels_last the module takes per-channel sums; its output equals
    nn.GroupNorm's under the same autocast within float32 rounding."""
    from modiff.models.ddim_unet import GroupNorm, fast_path_input

    x = (1.0 + torch.randn(4, 128, 16, 16, device="cuda")).bfloat16().to(memory_format=torch.channels_last)
    norm = GroupNorm(32, 128, eps=1e-6).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        assert fast_path_input(x)
        got, expected = norm(x), torch.nn.GroupNorm.forward(norm, x)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_projections_on_the_fast_path_are_one_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA under bf16 autocast with channels_last, an attention block's q, k and v come from one matmul
    (views of one output) and the block's output equals the three convolutions' within bf16 rounding."""
    from modiff.models import ddim_unet

    block = tiny_net(0).mid.attn_1.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 64, 8, 8, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        h = block.norm(x)
        q, k, v = ddim_unet.pointwise_projections(h, (block.q, block.k, block.v))
        fused = block(x)
        monkeypatch.setattr(ddim_unet, "_exposes_operands", lambda module: False)
        separate = block(x)
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() and q.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), separate.float(), atol=3e-2, rtol=3e-2)
