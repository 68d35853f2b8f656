"""Loading models: embedded presets and official checkpoints, behind one `Denoiser` type (`denoisers`)."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import yaml

from modiff.diffusion.schedules import NoiseSchedule, linear_schedule
from modiff.models.checkpoints import load_state_dict_strict
from modiff.models.ddim_unet import DDIMUNet, unet_config_from_yaml
from modiff.models.denoisers import Denoiser
from modiff.utils.checksums import load_checked
from modiff.utils.paths import data_dir

__all__ = ["load_model", "MODEL_PRESETS", "schedule_from_yaml"]

log = logging.getLogger(__name__)


MODEL_PRESETS: dict[str, str] = {
    "fmnist-ddim": "fmnist-ddim",
    "fmnist-ldm": "fmnist-ldm",
}


def schedule_from_yaml(config: Mapping[str, Any]) -> NoiseSchedule:
    diffusion = config.get("diffusion")
    if diffusion is None:
        raise ValueError("the config has no 'diffusion' section (beta_schedule, beta_start, beta_end, ...)")
    kind = diffusion.get("beta_schedule", "linear")
    if kind != "linear":
        raise ValueError(f"beta_schedule {kind!r} is not supported; allowed: 'linear'")
    return linear_schedule(
        float(diffusion["beta_start"]), float(diffusion["beta_end"]), int(diffusion["num_diffusion_timesteps"])
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with path.open() as f:
            config = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"{path} is not valid YAML ({problem}{where}); check that it is the model's config file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a YAML mapping")
    return config


def _torch_load(path: Path) -> Any:
    """torch.load of tensors only; a damaged or foreign file is a ValueError that says so (never the advice
    to unpickle arbitrary objects)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # Foreign bytes fail inside the unpickler in many ways: a bad opcode, a pop from its empty stack, an
    # unknown memo key, undecodable text.
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as err:
        text = str(err)
        if "Unsupported global" in text:
            name = text.split("Unsupported global:", 1)[1].split()[1] if "GLOBAL" in text else "a Python object"
            raise ValueError(f"{path} holds Python objects besides tensors ({name}), which modiff does not load "
                             f"(unpickling them can run code); save its state_dict alone where you trust the file, "
                             f"and load that") from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: it is damaged, truncated or another kind of "
                         f"file ({type(err).__name__}); check it against its source (size, checksum)") from None


def _official_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = _torch_load(path)
    if isinstance(state, (list, tuple)):  # the DDIM training code saves [model, optimizer, epoch, step, ema]
        state = state[-1] if isinstance(state[-1], dict) and len(state) == 5 else state[0]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # CompVis (Lightning) .ckpt
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_shards(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update({k: v.float() for k, v in load_checked(folder, name).items()})
    return state


def _load_folder(folder: Path, name: str, use_ema: bool = True) -> Denoiser:
    """A folder written by `modiff train`: config.yaml (official DDIM or CompVis LDM layout) and shards."""
    config = _read_yaml(folder / "config.yaml")
    if _is_ldm(config):
        from modiff.models.latent import latent_denoiser_from_compvis

        model = latent_denoiser_from_compvis(config, _load_shards(folder), name, use_ema)
    else:
        net = DDIMUNet(unet_config_from_yaml(config))
        load_state_dict_strict(net, _load_shards(folder), f"model {name!r} ({folder})", config["model"])
        model = Denoiser(net, schedule_from_yaml(config), name, config).eval()
    model.folder = folder
    return model


def _is_ldm(config: Mapping[str, Any]) -> bool:
    from modiff.models.latent import is_compvis_ldm_config

    return is_compvis_ldm_config(config)


def _load_diffusers(source: Any, config: Any, scheduler: Any) -> Denoiser:
    if config is not None:
        raise ValueError("a diffusers model brings its own config; pass config=None (and scheduler= if needed)")
    from modiff.models.diffusers.loading import from_diffusers, load_diffusers_folder

    if isinstance(source, (str, Path)):
        return load_diffusers_folder(source, scheduler=scheduler)
    return from_diffusers(source, scheduler=scheduler)


def _is_diffusers(source: Any) -> bool:
    from modiff.models.diffusers.loading import is_diffusers_folder, is_diffusers_object

    if isinstance(source, (str, Path)):
        return str(source) not in MODEL_PRESETS and Path(source).is_dir() and is_diffusers_folder(Path(source))
    return is_diffusers_object(source)


def load_model(name_or_path: Any, config: Optional[str | Path | Mapping[str, Any]] = None,
               *, use_ema: bool = True, scheduler: Any = None) -> Denoiser:
    """A preset name (see MODEL_PRESETS), a folder exported by `modiff train`, a checkpoint plus its
    YAML config (an official DDIM `.ckpt`, or a CompVis LDM `.ckpt` with weights under "state_dict"), or
    a diffusers model: a pipeline or network object, or a folder saved with `save_pretrained` (read
    offline; `modiff.models.diffusers`). A diffusers network alone needs `scheduler` (an object or a
    scheduler folder; a folder's default is the ``scheduler`` folder beside it).

    Returns a `Denoiser` in eval mode: the network and its noise schedule (a `LatentDenoiser`, which also
    holds the first stage, for a CompVis config; a `DiffusersDenoiser` for diffusers, on the device of its
    weights). `use_ema` picks a CompVis checkpoint's EMA UNet weights (model_ema.*) when it holds them, as
    the published LDM scripts do.
    """
    if _is_diffusers(name_or_path):
        return _load_diffusers(name_or_path, config, scheduler)
    if scheduler is not None:
        raise ValueError("scheduler= applies to diffusers models only")
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"load_model takes a preset name, a path, or a diffusers pipeline or network; got "
                        f"{type(name_or_path).__name__}")
    key = str(name_or_path)
    if key in MODEL_PRESETS:
        if config is not None:
            raise ValueError(f"preset {key!r} brings its own config; pass config=None")
        folder = data_dir() / MODEL_PRESETS[key]
        if not folder.is_dir():
            raise FileNotFoundError(f"the weights of preset {key!r} are missing: expected the folder {folder}")
        return _load_folder(folder, key, use_ema)
    path = Path(key)
    if path.is_dir() and (path / "config.yaml").is_file():
        return _load_folder(path, path.name, use_ema)
    if path.suffix not in {".ckpt", ".pt", ".pth", ".safetensors"}:
        raise ValueError(
            f"unknown model {key!r}: valid presets are {', '.join(sorted(MODEL_PRESETS))}, "
            f"a folder exported by `modiff train`, a diffusers folder (model_index.json or config.json), "
            f"or a checkpoint file (.ckpt, .pt, .pth, .safetensors) with config=its YAML"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if config is None:
        raise ValueError(f"checkpoint {path} needs its YAML config: load_model(path, config='cifar10.yml')")
    parsed = dict(config) if isinstance(config, Mapping) else _read_yaml(Path(config))
    state = load_checked(path.parent, path.name) if path.suffix == ".safetensors" else _official_state_dict(path)
    if _is_ldm(parsed):
        from modiff.models.latent import latent_denoiser_from_compvis

        return latent_denoiser_from_compvis(parsed, state, path.stem, use_ema)
    net = DDIMUNet(unet_config_from_yaml(parsed))
    load_state_dict_strict(net, state, f"checkpoint {path}", parsed["model"])
    return Denoiser(net, schedule_from_yaml(parsed), path.stem, parsed).eval()
