"""diffusers networks behind the toolkit's `Denoiser` interface: `model(x_t, t) -> eps`.

`DiffusersDenoiser` wraps a diffusers network (`net`: UNet2DModel, UNet2DConditionModel,
DiTTransformer2DModel, Transformer2DModel) with the noise schedule of its scheduler; the latent variant
keeps the pipeline's VAE beside `net` and decodes with it. Only `net` is the denoising network:
quantization, recording and BOP counting never see the text encoder or the VAE (as the published
Stable Diffusion runs keep them in full precision).

Conditioning lives in a context, never in the model's persistent state:

    with model.conditioned(prompts=["a cat", "a dog"], guidance_scale=7.5):
        x0 = md.sample_ddim(model, x_T, ts)

Classifier-free guidance runs both branches as ONE network call on the doubled batch, unconditional
rows first (diffusers' order): ``net(cat([x, x]), cat([t, t]), cond=cat([c_uncond, c]))`` ->
``eps_u + s (eps_c - eps_u)``. One call per sampling step keeps `trajectory()` working, and every
layer's MoDiff state is (2B, ...): rows 0..B-1 are the unconditional branch, rows B..2B-1 the
conditional one, each row its own residual stream.

Outputs are converted to eps after guidance (diffusers guides the raw output, then its scheduler
converts): v-prediction gives eps = sqrt(a_t) v + sqrt(1 - a_t) x_t; a learned variance (DiT's
2C output channels) is dropped.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union, get_args

import torch
from torch import nn

from modiff.diffusion.schedules import NoiseSchedule, Spacing
from modiff.models.denoisers import Denoiser

__all__ = ["Condition", "DiffusersDenoiser", "DiffusersLatentDenoiser", "NETWORK_CLASSES", "PredictionType",
           "REPEATED_MODULES", "schedule_from_scheduler", "scheduler_spacing"]

# The diffusers networks the wrapper knows how to call, and what conditioning each needs.
NETWORK_CLASSES: dict[str, Literal["none", "text", "class"]] = {
    "UNet2DModel": "none",
    "UNet2DConditionModel": "text",
    "DiTTransformer2DModel": "class",
    "Transformer2DModel": "class",
}
PredictionType = Literal["epsilon", "v_prediction"]
# Submodules a network calls twice per forward: DiT's output layer re-runs block 0's conditioning embedding.
REPEATED_MODULES: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("transformer_blocks.0.norm1.emb",),
    "Transformer2DModel": ("transformer_blocks.0.norm1.emb",),
}


def schedule_from_scheduler(scheduler: Any) -> NoiseSchedule:
    """The scheduler's betas as a `NoiseSchedule`: alpha_bar = cumprod(1 - betas) in float32, as diffusers
    computes `alphas_cumprod`; the value after the last step is the scheduler's `final_alpha_cumprod`
    (1 with set_alpha_to_one, else alpha_bar_0), or 1 for schedulers without one (DDPM)."""
    betas = getattr(scheduler, "betas", None)
    if not isinstance(betas, torch.Tensor):
        raise TypeError(f"{type(scheduler).__name__} has no `betas` tensor; pass a diffusers noise scheduler "
                        f"(DDIMScheduler, DDPMScheduler, PNDMScheduler, ...)")
    if getattr(scheduler.config, "rescale_betas_zero_snr", False):
        raise ValueError("schedulers with rescale_betas_zero_snr=True end on alpha_bar = 0 (beta_T = 1), which "
                         "the toolkit's samplers do not support; load the model with a scheduler without it")
    final = getattr(scheduler, "final_alpha_cumprod", 1.0)
    schedule = NoiseSchedule(betas.detach().float().cpu(), final_alpha_bar=float(final))
    cumprod = getattr(scheduler, "alphas_cumprod", None)
    assert cumprod is None or torch.equal(schedule.alpha_bar, cumprod.float().cpu()), "alpha_bar differs"
    return schedule


def scheduler_spacing(scheduler: Any) -> Spacing:
    """The toolkit spacing of the DDIM timesteps of the scheduler's config (a DDIMScheduler made from it, as
    a pipeline switched to DDIM): ``uniform`` for "leading" spacing with steps_offset 0 (range(0, T, T // S)),
    ``ldm`` for steps_offset 1 (Stable Diffusion). Other spacings ("trailing", "linspace") have no toolkit
    equivalent: sample with `sample_scheduler`."""
    from diffusers import DDIMScheduler

    config = DDIMScheduler.from_config(scheduler.config).config
    spacing, offset = config.timestep_spacing, int(config.steps_offset)
    if spacing != "leading" or offset not in (0, 1):
        raise ValueError(f"timestep_spacing={spacing!r} with steps_offset={offset} has no toolkit spacing (allowed: "
                         f"'leading' with steps_offset 0 or 1); sample with "
                         f"modiff.models.diffusers.sampling.sample_scheduler, or load another scheduler")
    return "uniform" if offset == 0 else "ldm"


def _json_ready(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config), default=str))


@dataclass(frozen=True)
class Condition:
    """The network's conditioning keywords for one batch of B samples.

    ``kwargs`` hold (2B, ...) tensors when ``guidance_scale`` > 1 (unconditional rows first), else (B, ...).
    """

    batch: int
    guidance_scale: float = 1.0
    kwargs: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


class DiffusersDenoiser(Denoiser):
    """A diffusers network and its scheduler's schedule: `model(x_t, t) -> eps` (see the module docstring).

    Layers live under `net` (``net.down_blocks.0.resnets.0.conv1``). ``scheduler`` is the pipeline's, kept for
    `sample_scheduler` and export; ``text_encoder``/``tokenizer`` encode prompts (text models only).
    """

    net_takes_keywords = True  # timestep=, encoder_hidden_states=, return_dict=

    def __init__(self, net: nn.Module, scheduler: Any, name: str, *, text_encoder: Optional[nn.Module] = None,
                 tokenizer: Any = None):
        kind = type(net).__name__
        if kind not in NETWORK_CLASSES:
            raise TypeError(f"unsupported diffusers network {kind}; supported: {', '.join(NETWORK_CLASSES)}")
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction not in get_args(PredictionType):
            raise ValueError(f"prediction_type {prediction!r} is not supported; allowed: {', '.join(get_args(PredictionType))}")
        config = {"network": kind, "net": _json_ready(net.config), "scheduler": type(scheduler).__name__,
                  "scheduler_config": _json_ready(scheduler.config)}
        super().__init__(net, schedule_from_scheduler(scheduler), name, config)
        self.scheduler = scheduler
        self.prediction_type: PredictionType = prediction
        self.conditioning = NETWORK_CLASSES[kind]
        self.text_encoder = None if text_encoder is None else text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer  # without both, a text model takes prompt_embeds= only
        self._condition: Optional[Condition] = None

    # ---- shapes and conventions -------------------------------------------------------------------

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        config = self.net.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config.in_channels), int(height), int(width))

    @property
    def spacing(self) -> Spacing:
        """The toolkit spacing of the scheduler's DDIM timesteps (`scheduler_spacing`)."""
        return scheduler_spacing(self.scheduler)

    @property
    def requires_condition(self) -> bool:
        if self.conditioning == "none":
            return getattr(self.net.config, "num_class_embeds", None) is not None
        return True

    def network_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """`net`'s modules, less those it calls more than once per forward (`REPEATED_MODULES`): a second
        call in one sampling step has no MoDiff meaning, so they stay in full precision, unrecorded and
        uncounted (DiT's shared timestep/label embedding MLP: under 0.01% of its MACs)."""
        repeated = tuple(f"net.{name}" for name in REPEATED_MODULES.get(type(self.net).__name__, ()))
        for name, module in self.net.named_modules(prefix="net"):
            if not any(name == r or name.startswith(r + ".") for r in repeated):
                yield name, module

    def attention_cores(self) -> list[str]:
        """No cores: diffusers attention runs inside its processors; the matmuls stay in full precision, as in
        the published MoDiff runs (`quantize_attention` has nothing to wrap). Their MACs are counted by
        `count_attention_macs`."""
        return []

    def count_attention_macs(self) -> contextlib.AbstractContextManager:
        """A context that counts the attention matmul MACs of one image (`modiff.quant.cost.measure_macs`)."""
        from modiff.models.diffusers.attention import AttentionMacs

        return AttentionMacs(self.net)

    # ---- conditioning ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings (B, L, D) as the diffusers pipelines make them: padded to the tokenizer's
        model_max_length, truncated, the text encoder's last hidden state."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"{self.name} has no text encoder and tokenizer; load the whole pipeline folder, "
                             f"or pass prompt_embeds= to conditioned()")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {prompts!r}")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def _text_kwargs(self, prompts: Optional[Sequence[str]], prompt_embeds: Optional[torch.Tensor],
                     negative: Union[str, Sequence[str], torch.Tensor], guided: bool) -> tuple[int, dict[str, torch.Tensor]]:
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("a text-conditioned model needs prompts=[...] or prompt_embeds=, one of them")
        embeds = self.encode_prompts(prompts) if prompt_embeds is None else prompt_embeds
        batch = embeds.shape[0]
        if guided:
            if isinstance(negative, torch.Tensor):
                uncond = negative
            else:
                negatives = [negative] * batch if isinstance(negative, str) else list(negative)
                if len(negatives) != batch:
                    raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
                uncond = self.encode_prompts(negatives)
            if uncond.shape != embeds.shape:
                raise ValueError(f"negative embeddings {tuple(uncond.shape)} differ from the prompts' {tuple(embeds.shape)}")
            embeds = torch.cat([uncond, embeds])
        return batch, {"encoder_hidden_states": embeds}

    def _class_kwargs(self, class_labels: Optional[Sequence[int] | torch.Tensor], guided: bool
                      ) -> tuple[int, dict[str, torch.Tensor]]:
        if class_labels is None:
            raise ValueError(f"{type(self.net).__name__} is class-conditional: pass class_labels=[...]")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if guided:
            null = getattr(self.net.config, "num_embeds_ada_norm", None)
            if null is None:
                raise ValueError(f"{type(self.net).__name__} has no null class (num_embeds_ada_norm) for guidance")
            labels = torch.cat([torch.full_like(labels, int(null)), labels])
        return len(labels) // (2 if guided else 1), {"class_labels": labels}

    @contextlib.contextmanager
    def conditioned(self, prompts: Optional[Sequence[str]] = None, *, prompt_embeds: Optional[torch.Tensor] = None,
                    negative_prompt: Union[str, Sequence[str], torch.Tensor] = "",
                    class_labels: Optional[Sequence[int] | torch.Tensor] = None,
                    guidance_scale: float = 1.0) -> Iterator[Condition]:
        """Condition every call of the model inside the block on one batch of prompts or class labels.

        guidance_scale > 1 turns classifier-free guidance on (diffusers' rule): the unconditional branch is
        the negative prompt ("" by default, or its embeddings) or the null class. The batch of x_t must
        equal the number of prompts / labels.
        """
        if self._condition is not None:
            raise RuntimeError("conditioned() is already active for this model; nesting is not allowed")
        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {guidance_scale}")
        guided = guidance_scale > 1.0
        if self.conditioning == "text":
            batch, kwargs = self._text_kwargs(prompts, prompt_embeds, negative_prompt, guided)
        elif self.conditioning == "class" or self.requires_condition:
            if prompts is not None or prompt_embeds is not None:
                raise ValueError(f"{type(self.net).__name__} is class-conditional; pass class_labels, not prompts")
            batch, kwargs = self._class_kwargs(class_labels, guided)
        else:
            raise ValueError(f"{type(self.net).__name__} {self.name!r} is unconditional: sample it without conditioned()")
        device = next(self.net.parameters()).device
        dtype = next(self.net.parameters()).dtype
        kwargs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in kwargs.items()}
        self._condition = Condition(batch, float(guidance_scale), kwargs)
        try:
            yield self._condition
        finally:
            self._condition = None

    def placeholder_condition(self) -> contextlib.AbstractContextManager:
        """A batch-1 condition of the right shapes (zero prompt embeddings, or class 0), for counting MACs
        and BOPs: the cost of one evaluation does not depend on the prompt. Nothing for an unconditional model."""
        if not self.requires_condition:
            return contextlib.nullcontext()
        if self.conditioning != "text":
            return self.conditioned(class_labels=[0])
        width = self.net.config.cross_attention_dim
        width = width if isinstance(width, int) else width[0]
        tokens = self.tokenizer.model_max_length if self.tokenizer is not None else 77  # CLIP's context
        embeds = torch.zeros(1, tokens, int(width), device=next(self.net.parameters()).device)
        return self.conditioned(prompt_embeds=embeds)

    # ---- the call ---------------------------------------------------------------------------------

    def _raw(self, x: torch.Tensor, t: torch.Tensor, kwargs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        out = self.net(x.to(dtype), timestep=t, return_dict=False, **kwargs)[0]
        return out[:, : x.shape[1]]  # a learned variance (2C channels, DiT) is dropped

    def _to_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        a = self.schedule.alpha_bar.to(x.device)[t].view(-1, *([1] * (x.ndim - 1)))
        return a.sqrt() * out + (1 - a).sqrt() * x  # v-prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        condition = self._condition
        if condition is None:
            if self.requires_condition:
                raise RuntimeError(f"{type(self.net).__name__} {self.name!r} is conditional: call it inside "
                                   f"`with model.conditioned(prompts=...)` (or class_labels=...)")
            return self._to_eps(self._raw(x, t, {}), x, t)
        if x.shape[0] != condition.batch:
            raise ValueError(f"x_t holds {x.shape[0]} samples but the conditioning {condition.batch}")
        if not condition.guided:
            return self._to_eps(self._raw(x, t, condition.kwargs), x, t)
        uncond, cond = self._raw(torch.cat([x, x]), torch.cat([t, t]), condition.kwargs).chunk(2)
        return self._to_eps(uncond + condition.guidance_scale * (cond - uncond), x, t)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "diffusers_network": type(self.net).__name__,
                "prediction_type": self.prediction_type}


class DiffusersLatentDenoiser(DiffusersDenoiser):
    """A latent diffusers network with the pipeline's VAE beside it: `decode(z)` gives images in [-1, 1]."""

    def __init__(self, net: nn.Module, scheduler: Any, vae: nn.Module, name: str, **components: Any):
        super().__init__(net, scheduler, name, **components)
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], float32 (as the pipelines decode)."""
        z = z.to(next(self.vae.parameters()).dtype) / self.scale_factor + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents: the posterior mode, or a sample with `generator`."""
        posterior = self.vae.encode(x.to(next(self.vae.parameters()).dtype)).latent_dist
        z = posterior.mode() if generator is None else posterior.sample(generator=generator)
        return (z - self.shift_factor) * self.scale_factor

    def describe(self) -> dict[str, Any]:
        vae = sum(p.numel() for p in self.vae.parameters())
        return {**super().describe(), "first_stage_parameters": vae, "scale_factor": self.scale_factor}
