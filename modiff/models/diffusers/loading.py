"""diffusers models and pipelines -> `DiffusersDenoiser`, from objects in memory or folders on disk.

Nothing is ever downloaded: folders are read with ``local_files_only=True``, and every file a component
needs is checked first, so a missing one fails with its name instead of a hub look-up. A pipeline
folder (``model_index.json``, one subfolder per component, as `save_pretrained` writes it) gives the
network (``unet`` or ``transformer``), its ``scheduler`` and, where present, the ``vae``, ``text_encoder``
and ``tokenizer``; other components (a safety checker, a feature extractor) are not loaded. A model
folder (``config.json`` naming a diffusers class) needs a scheduler: ``scheduler=`` (an object or a
scheduler folder), else the ``scheduler`` folder beside it.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from modiff.models.diffusers.denoiser import NETWORK_CLASSES, DiffusersDenoiser, DiffusersLatentDenoiser

__all__ = ["from_diffusers", "is_diffusers_folder", "is_diffusers_object", "load_diffusers_folder"]

NETWORK_COMPONENTS = ("unet", "transformer")
LIBRARIES = ("diffusers", "transformers")
SchedulerSource = Union[None, str, Path, Any]

# What each kind of component folder must hold (any one of the names in a group).
_WEIGHTS = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                  "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def is_diffusers_object(obj: Any) -> bool:
    """Whether `obj` is a diffusers model or pipeline (by the module of its class; diffusers not imported)."""
    return type(obj).__module__.split(".")[0] == "diffusers"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it should be what save_pretrained wrote") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def is_diffusers_folder(path: Path) -> bool:
    """A pipeline folder (model_index.json) or a diffusers model folder (config.json with a `_class_name`)."""
    if (path / "model_index.json").is_file():
        return True
    config = path / "config.json"
    return config.is_file() and "_class_name" in _read_json(config)


def _require(folder: Path, names: tuple[str, ...], what: str) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: the folder {folder} does not exist")
    if not any((folder / n).is_file() for n in names):
        present = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{what}: {folder} holds none of {', '.join(names)} (it holds {present}); "
                                f"modiff never downloads: save the component there with save_pretrained")


def _import_class(library: str, class_name: str, component: str) -> type:
    try:
        module = importlib.import_module(library)
    except ImportError as err:
        raise ImportError(f"component {component!r} needs the package {library!r}: pip install 'modiff[diffusers]'") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"{library} {getattr(module, '__version__', '')} has no class {class_name!r} "
                         f"(component {component!r})")
    return cls


def _load_component(folder: Path, library: str, class_name: str, component: str) -> Any:
    what = f"component {component!r} ({class_name})"
    if library not in LIBRARIES:
        raise ValueError(f"component {component!r} comes from {library!r}; modiff loads components of "
                         f"{' and '.join(LIBRARIES)} only")
    if component == "scheduler":
        _require(folder, ("scheduler_config.json",), what)
    elif component == "tokenizer":
        _require(folder, _TOKENIZER_FILES, what)
    else:
        _require(folder, ("config.json",), what)
        _require(folder, _WEIGHTS[library], what)
    cls = _import_class(library, class_name, component)
    if library == "diffusers" and component != "scheduler":  # without accelerate, say so once, not per load
        return cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    return cls.from_pretrained(folder, local_files_only=True)


def _load_scheduler(source: SchedulerSource, beside: Path) -> Any:
    if source is not None and not isinstance(source, (str, Path)):
        return source
    folder = Path(source) if source is not None else beside
    if not (folder / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"no scheduler: {folder} has no scheduler_config.json. A model folder needs its "
                                f"scheduler: pass scheduler= (a diffusers scheduler or its folder), or load the "
                                f"pipeline folder that holds both")
    config = _read_json(folder / "scheduler_config.json")
    return _load_component(folder, "diffusers", str(config.get("_class_name", "DDIMScheduler")), "scheduler")


def _wrap(net: nn.Module, scheduler: Any, name: str, components: dict[str, Any]) -> DiffusersDenoiser:
    if type(net).__name__ not in NETWORK_CLASSES:
        raise TypeError(f"unsupported diffusers network {type(net).__name__}; supported: {', '.join(NETWORK_CLASSES)}")
    if scheduler is None:
        raise ValueError(f"{type(net).__name__} needs a noise scheduler: pass scheduler=... (e.g. DDIMScheduler)")
    extra = {k: components.get(k) for k in ("text_encoder", "tokenizer")}
    vae = components.get("vae")
    if vae is not None:
        return DiffusersLatentDenoiser(net.eval(), scheduler, vae, name, **extra).eval()
    return DiffusersDenoiser(net.eval(), scheduler, name, **extra).eval()


def from_diffusers(obj: Any, *, scheduler: Any = None, name: Optional[str] = None) -> DiffusersDenoiser:
    """Wrap a diffusers pipeline (its network, scheduler, VAE, text encoder and tokenizer) or a diffusers
    network with `scheduler`. The objects are shared with `obj`, not copied."""
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        nets = [components[k] for k in NETWORK_COMPONENTS if components.get(k) is not None]
        if not nets:
            raise ValueError(f"{type(obj).__name__} has no 'unet' or 'transformer' component")
        chosen = scheduler if scheduler is not None else components.get("scheduler")
        return _wrap(nets[0], chosen, name or type(obj).__name__, components)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"expected a diffusers pipeline or network, got {type(obj).__name__}")
    return _wrap(obj, scheduler, name or type(obj).__name__, {})


def _load_pipeline_folder(folder: Path, scheduler: SchedulerSource) -> DiffusersDenoiser:
    index = _read_json(folder / "model_index.json")
    entries = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    networks = [k for k in NETWORK_COMPONENTS if k in entries]
    if not networks:
        raise ValueError(f"{folder / 'model_index.json'} names no 'unet' or 'transformer' component "
                         f"(components: {sorted(entries)})")
    components: dict[str, Any] = {}
    for key in (networks[0], "vae", "text_encoder", "tokenizer"):
        if key in entries:
            library, class_name = entries[key]
            components[key] = _load_component(folder / key, str(library), str(class_name), key)
    chosen = _load_scheduler(scheduler, folder / "scheduler")
    return _wrap(components.pop(networks[0]), chosen, folder.name, components)


def load_diffusers_folder(folder: str | Path, *, scheduler: SchedulerSource = None) -> DiffusersDenoiser:
    """A pipeline folder or a diffusers model folder saved with `save_pretrained` (see the module doc)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        model = _load_pipeline_folder(folder, scheduler)
    else:
        _require(folder, ("config.json",), f"diffusers model folder {folder}")
        class_name = str(_read_json(folder / "config.json").get("_class_name", ""))
        if class_name not in NETWORK_CLASSES:
            raise ValueError(f"{folder} holds a {class_name or 'model without _class_name'}; supported networks: "
                             f"{', '.join(NETWORK_CLASSES)} (or a pipeline folder with model_index.json)")
        net = _load_component(folder, "diffusers", class_name, folder.name)
        model = _wrap(net, _load_scheduler(scheduler, folder.parent / "scheduler"), folder.name, {})
    model.folder = folder
    return model
