"""diffusers models behind the Denoiser interface: faithful sampling, guidance, MoDiff state per branch,
quantization, recording and BOPs on the wrapped network."""
from __future__ import annotations

import ast
import json
import contextlib
from pathlib import Path
from typing import Iterator

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import EulerDiscreteScheduler, PNDMScheduler  # noqa: E402

import modiff as md  # noqa: E402
from modiff.models.conventions import default_spacing, edge_layers, middle_block, representative_layers  # noqa: E402
from modiff.models.diffusers.sampling import sample_scheduler, scheduler_timesteps  # noqa: E402
from modiff.models.diffusers.tiny import tiny_text_to_image  # noqa: E402
from modiff.quant import quant_layers, select_layers  # noqa: E402
from modiff.quant.cost import compute_report  # noqa: E402

from tiny_diffusers import ddim_scheduler, tiny_dit, tiny_unet2d  # noqa: E402

PROMPTS = ["the cat", "a dog"]
EXACT_MODIFF = md.QuantConfig(weight=None, activation=None, mode="modulated")  # MoDiff with Q = identity


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_text_to_image(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(pipe) -> md.Denoiser:
    return md.load_model(pipe)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to float rounding, relative to the tensor's scale."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def _diffusers_ddim_loop(unet, scheduler, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' DDIMScheduler loop, written out by hand."""
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


# ---- sampling: the toolkit's DDIM and the scheduler loop against diffusers ---------------------------


@pytest.mark.parametrize("overrides", [{}, {"set_alpha_to_one": True, "steps_offset": 0},
                                       {"prediction_type": "v_prediction"}])
def test_toolkit_ddim_takes_the_steps_of_diffusers_ddim(overrides: dict) -> None:
    unet, scheduler = tiny_unet2d(), ddim_scheduler(**overrides)
    model = md.load_model(unet, scheduler=scheduler)
    x_T = md.noise(range(2), model.sample_shape)
    reference = _diffusers_ddim_loop(unet, scheduler, x_T, 10)
    ts = scheduler_timesteps(model, 10)
    assert ts == md.timesteps(10, default_spacing(model))  # "leading" spacing is the toolkit's uniform / ldm
    _close(md.sample_ddim(model, x_T, ts), reference)
    assert torch.equal(sample_scheduler(model, x_T, 10), reference) == (overrides.get("prediction_type") is None)


def test_scheduler_loop_is_the_text_pipeline_bit_for_bit(pipe, sd) -> None:
    x_T = md.noise(range(2), sd.sample_shape)
    reference = pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=x_T.clone(), output_type="latent").images
    with sd.conditioned(PROMPTS, guidance_scale=5.0):
        assert torch.equal(sample_scheduler(sd, x_T, 3), reference)
        _close(md.sample_ddim(sd, x_T, scheduler_timesteps(sd, 3)), reference)
    ddim = pipe.scheduler
    try:
        for other in (PNDMScheduler, EulerDiscreteScheduler):  # multistep and sigma-space schedulers too
            pipe.scheduler = other.from_config(ddim.config)
            model = md.load_model(pipe)
            reference = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=x_T.clone(),
                             output_type="latent").images
            with model.conditioned(PROMPTS, guidance_scale=5.0):
                assert torch.equal(sample_scheduler(model, x_T, 4), reference), other.__name__
    finally:
        pipe.scheduler = ddim
    images = pipe.image_processor.postprocess(pipe.vae.decode(reference / pipe.vae.config.scaling_factor).sample,
                                              output_type="pt")
    _close(md.to_images(sd, reference) * 0.5 + 0.5, images)
    assert sd.sample_shape == (4, 8, 8) and images.shape == (2, 3, 16, 16)


@torch.no_grad()
def test_guidance_is_one_call_on_the_doubled_batch(sd) -> None:
    calls: list[tuple[int, ...]] = []
    handle = sd.net.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    x, t = torch.randn(2, *sd.sample_shape), torch.full((2,), 500)
    try:
        with sd.conditioned(PROMPTS, guidance_scale=4.0):
            guided = sd(x, t)
        with sd.conditioned(PROMPTS):  # guidance_scale 1: the conditional branch alone
            cond = sd(x, t)
        with sd.conditioned(["", ""]):
            uncond = sd(x, t)
    finally:
        handle.remove()
    assert calls == [(4, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)]
    _close(guided, uncond + 4.0 * (cond - uncond), rel=1e-4)


# ---- MoDiff under classifier-free guidance ------------------------------------------------------------


@contextlib.contextmanager
def _last_inputs(model: torch.nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The input of each named layer at its last call inside the block."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_exact_modiff_equals_fp_under_guidance_with_state_per_branch(sd) -> None:
    cross_k = "net.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # reads the text embeddings
    after = "net.down_blocks.0.attentions.0.proj_out"  # reads features that differ per branch
    x_T, ts = md.noise(range(2), sd.sample_shape), scheduler_timesteps(sd, 4)
    with _last_inputs(sd, [cross_k, after]) as seen, sd.conditioned(PROMPTS, guidance_scale=5.0):
        fp = md.sample_ddim(sd, x_T, ts)
    qmodel = md.quantize(sd, EXACT_MODIFF)
    with md.trajectory(qmodel), qmodel.conditioned(PROMPTS, guidance_scale=5.0):
        modiff = md.sample_ddim(qmodel, x_T, ts)
        states = {name: layer.state.a_hat.clone() for name, layer in quant_layers(qmodel).items()}
    _close(modiff, fp, rel=1e-4)
    # a_hat has the doubled batch: rows 0-1 the unconditional branch (""), rows 2-3 the prompts.
    assert states[cross_k].shape[0] == 4
    _close(states[cross_k][:2], sd.encode_prompts(["", ""]))
    _close(states[cross_k][2:], sd.encode_prompts(PROMPTS))
    _close(states[after], seen[after], rel=1e-4)  # each row follows its own branch's input
    assert not torch.allclose(seen[after][:2], seen[after][2:])


def _first_sample(model: md.Denoiser, preset: str, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    qmodel = md.quantize(model, md.presets[preset])
    x_T = md.noise(seeds, model.sample_shape)
    with md.trajectory(qmodel), qmodel.conditioned(prompts, guidance_scale=5.0):
        return md.sample_ddim(qmodel, x_T, scheduler_timesteps(model, 3))[0]


def test_per_sample_modiff_keeps_samples_and_branches_apart(sd) -> None:
    """With per-sample scales, sample 0 (both its branches) does not depend on its batch companion; with the
    published per-tensor scale (one for the whole doubled batch) it does. Same batch size, so the same kernels."""
    companions = (["the cat", "a dog"], [0, 1]), (["the cat", "zz 9"], [0, 5])
    per_sample = [_first_sample(sd, "w8a4-modiff", prompts, seeds) for prompts, seeds in companions]
    per_tensor = [_first_sample(sd, "published-w8a4-modiff", prompts, seeds) for prompts, seeds in companions]
    assert torch.equal(*per_sample)
    assert not torch.allclose(*per_tensor, atol=1e-3)


# ---- quantization, recording, BOPs and conventions on the wrapped network --------------------------------


def test_quantize_record_and_bops_see_the_denoising_network_only(sd) -> None:
    layers = [n for n, m in sd.net.named_modules(prefix="net") if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert select_layers(sd, md.presets["w8a8"]) == layers  # no text encoder, no VAE layer
    x_T, ts = md.noise(range(2), sd.sample_shape), scheduler_timesteps(sd, 2)
    with md.record(sd, sites="conv,linear", reducers=[md.Stats()]) as rec, sd.conditioned(PROMPTS, guidance_scale=2.0):
        md.sample_ddim(sd, x_T, ts, callback=rec.on_step)
    stats = rec.stats_frame()
    assert set(stats["site"]) == set(layers) and set(stats["call"]) == {0}  # both branches in one call
    with sd.placeholder_condition():
        report = compute_report(sd, steps=10)
    assert report["layers_counted"] == len(layers)
    # self-attention over 64 tokens (8x8, width 32) and cross-attention to 8 text tokens, three times
    # (one down, two up); in the 4x4 middle block at width 64 once. q k^T and attn v: 2 x width each.
    expected = 3 * 64 * (64 + 8) * 2 * 32 + 16 * (16 + 8) * 2 * 64
    assert report["gmacs_attention_matmuls"] * 1e9 == pytest.approx(expected)


@pytest.mark.parametrize("which", ["text", "unet2d", "dit"])
def test_each_selected_layer_runs_once_per_call(sd, which: str) -> None:
    """MoDiff keeps one state per layer and step: every layer quantize selects runs once per model call."""
    model = {"text": lambda: sd, "unet2d": lambda: md.load_model(tiny_unet2d(), scheduler=ddim_scheduler()),
             "dit": lambda: md.load_model(tiny_dit(), scheduler=ddim_scheduler())}[which]()
    names = select_layers(model, md.presets["w8a8"])
    counts = dict.fromkeys(names, 0)
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: counts.__setitem__(n, counts[n] + 1)) for n in names]
    try:
        with model.placeholder_condition():
            model(torch.randn(1, *model.sample_shape), torch.full((1,), 10))
    finally:
        for h in handles:
            h.remove()
    assert set(counts.values()) == {1}
    first, last = edge_layers(model)
    assert names[0] == first if which != "dit" else first in names
    assert last in names and middle_block(model) and set(representative_layers(model)) == {"middle", "up", "down"}


def test_dit_class_guidance_and_exact_modiff() -> None:
    model = md.load_model(tiny_dit(), scheduler=ddim_scheduler())
    x_T, ts = md.noise(range(2), model.sample_shape), scheduler_timesteps(model, 3)
    with model.conditioned(class_labels=[3, 7], guidance_scale=4.0):
        fp = md.sample_ddim(model, x_T, ts)
        assert model(x_T, torch.full((2,), 5)).shape == (2, 4, 8, 8)  # the learned variance is dropped
    qmodel = md.quantize(model, EXACT_MODIFF)
    with md.trajectory(qmodel) as states, qmodel.conditioned(class_labels=[3, 7], guidance_scale=4.0):
        modiff = md.sample_ddim(qmodel, x_T, ts)
        assert {s.a_hat.shape[0] for s in states} == {4}
    _close(modiff, fp, rel=1e-4)
    assert "net.transformer_blocks.0.norm1.emb.timestep_embedder.linear_1" not in select_layers(model, EXACT_MODIFF)


# ---- errors ----------------------------------------------------------------------------------------


def test_conditioning_errors(sd) -> None:
    x, t = torch.randn(2, *sd.sample_shape), torch.full((2,), 5)
    with pytest.raises(RuntimeError, match="inside `with model.conditioned"):
        sd(x, t)
    with sd.conditioned(PROMPTS[:1]):
        with pytest.raises(ValueError, match="holds 2 samples but the conditioning 1"):
            sd(x, t)
        with pytest.raises(RuntimeError, match="nesting"):
            with sd.conditioned(PROMPTS):
                pass
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        with sd.conditioned(PROMPTS, guidance_scale=0.5):
            pass
    with pytest.raises(ValueError, match="prompts=.*or prompt_embeds"):
        with sd.conditioned():
            pass
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        with sd.conditioned(PROMPTS, negative_prompt=["blurry"], guidance_scale=2.0):
            pass
    dit = md.load_model(tiny_dit(), scheduler=ddim_scheduler())
    with pytest.raises(ValueError, match="class-conditional; pass class_labels"):
        with dit.conditioned(PROMPTS):
            pass
    unconditional = md.load_model(tiny_unet2d(), scheduler=ddim_scheduler())
    with pytest.raises(ValueError, match="unconditional"):
        with unconditional.conditioned(class_labels=[1]):
            pass


def test_model_and_scheduler_errors() -> None:
    with pytest.raises(ValueError, match="needs a noise scheduler"):
        md.load_model(tiny_unet2d())
    with pytest.raises(TypeError, match="unsupported diffusers network AutoencoderKL"):
        from diffusers import AutoencoderKL

        md.load_model(AutoencoderKL(block_out_channels=(32,), norm_num_groups=32), scheduler=ddim_scheduler())
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        md.load_model(tiny_unet2d(), scheduler=ddim_scheduler(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        md.load_model(tiny_unet2d(), scheduler=ddim_scheduler(prediction_type="sample"))
    trailing = md.load_model(tiny_unet2d(), scheduler=ddim_scheduler(timestep_spacing="trailing"))
    with pytest.raises(ValueError, match="cannot follow it: use sample_scheduler"):
        scheduler_timesteps(trailing, 3)
    with pytest.raises(ValueError, match="has no toolkit spacing"):
        default_spacing(trailing)
    with pytest.raises(ValueError, match="scheduler= applies to diffusers models only"):
        md.load_model("fmnist-ddim", scheduler=ddim_scheduler())


def test_diffusers_is_imported_lazily() -> None:
    """No module of modiff imports diffusers or transformers at module level: modiff works without them."""
    root = Path(md.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only (also under `if`/`try`)
            for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
                names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else \
                    [inner.module or ""] if isinstance(inner, ast.ImportFrom) else []
                found += [f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in ("diffusers", "transformers")]
    assert not found


def test_sd15_unet_counts_on_the_meta_device_as_the_committed_table() -> None:
    """SD v1.5's UNet from its config, without weights: its parameter count, and the cost module's count
    of one evaluation equals the fp row of benchmarks/results/sd15_unet_bops.json."""
    from diffusers import DDIMScheduler

    from modiff.models.diffusers.reference import SD15_SCHEDULER, sd15_unet_on_meta

    net = sd15_unet_on_meta()
    assert sum(p.numel() for p in net.parameters()) == 859_520_964
    model = md.load_model(net, scheduler=DDIMScheduler(**SD15_SCHEDULER))
    with model.placeholder_condition():
        report = compute_report(model, steps=50)
    committed = json.loads((Path(__file__).parents[2] / "benchmarks/results/sd15_unet_bops.json").read_text())
    fp = next(row for row in committed["rows"] if row["preset"] == "fp")
    for key in ("layers_counted", "gmacs_conv_linear", "gmacs_attention_matmuls", "gbops_per_trajectory"):
        assert report[key] == pytest.approx(fp[key], rel=1e-12), key
    assert report["layers_counted"] == 282 and round(report["gmacs_conv_linear"], 1) == 338.6
