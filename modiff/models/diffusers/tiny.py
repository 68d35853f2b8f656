"""A tiny, randomly initialised text-to-image pipeline, built offline: for tests and smoke runs.

Stable Diffusion's layout at toy sizes: a CLIP text encoder (2 layers, width 32) with a CLIP BPE tokenizer
whose vocabulary (letters, digits and "the") is written here, a UNet2DConditionModel with cross-attention
on 4x8x8 latents, a KL VAE (16x16 RGB images) and a DDIM scheduler with SD's betas. Its images are noise;
what it is for is every code path of a real pipeline (tokenizer, text encoder, guidance, VAE decoding)
without a download.
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["tiny_text_to_image", "TINY_MAX_TOKENS"]

TINY_MAX_TOKENS = 8


def _tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab.update({"th": len(vocab), "the</w>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TINY_MAX_TOKENS)


def tiny_text_to_image(seed: int = 0) -> Any:
    """A StableDiffusionPipeline of random tiny components (weights from `seed`); no safety checker."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from modiff.models.diffusers.reference import SD15_SCHEDULER

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TINY_MAX_TOKENS, projection_dim=32,
            bos_token_id=0, eos_token_id=1, pad_token_id=1))
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, sample_size=16,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
