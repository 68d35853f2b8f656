"""diffusers models in the toolkit: wrap, load (offline), sample with their scheduler, convert and export.

diffusers (and transformers, for text encoders) are optional: ``pip install 'modiff[diffusers]'``. This
package imports neither until a function needs it.

- `denoiser`: `DiffusersDenoiser` / `DiffusersLatentDenoiser`, the `Denoiser` interface over a diffusers
  network and its scheduler; conditioning and classifier-free guidance (`conditioned`).
- `loading`: `from_diffusers` (objects) and `load_diffusers_folder` (save_pretrained folders).
- `sampling`: `sample_scheduler` (the pipeline's own scheduler loop) and `scheduler_timesteps`.
- `convert`: the official DDIM UNet as a diffusers UNet2DModel, `export_diffusers`.
- `attention`: MACs of the attention matmuls; `tiny`: a tiny random text-to-image pipeline for tests;
  `reference`: the Stable Diffusion v1.5 UNet config (for counting on the meta device).
"""
from modiff.models.diffusers.denoiser import Condition, DiffusersDenoiser, DiffusersLatentDenoiser
from modiff.models.diffusers.loading import from_diffusers, is_diffusers_folder, is_diffusers_object, load_diffusers_folder

__all__ = ["Condition", "DiffusersDenoiser", "DiffusersLatentDenoiser", "from_diffusers", "is_diffusers_folder",
           "is_diffusers_object", "load_diffusers_folder"]
