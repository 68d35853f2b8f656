"""The Fashion-MNIST classifier as a torch-fidelity feature extractor (registered by `modiff.metrics.fidelity`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["extractor_class"]


def extractor_class() -> type:
    """The torch-fidelity feature-extractor class of the Fashion-MNIST classifier (built lazily: torch-fidelity
    is imported only when metrics are computed)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class FMNISTFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity adapter: uint8 (B, C, H, W) -> (penultimate (B, 128), logits (B, 10))."""

        def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: Optional[str] = None, **kwargs: Any):
            from modiff.metrics.classifier import load_classifier

            super().__init__(name, features_list)
            self.classifier = load_classifier(Path(feature_extractor_weights_path).parent if feature_extractor_weights_path else None)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("penultimate", "logits_unbiased")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits_unbiased" if metric == "isc" else "penultimate"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if x.dtype != torch.uint8:
                raise TypeError(f"the feature extractor takes uint8 images, got {x.dtype}")
            if x.shape[1] > 1 and not (x == x[:, :1]).all():
                raise ValueError("the Fashion-MNIST classifier scores gray images, got colour ones (channels "
                                 "differ); convert them to gray, or use the Inception extractor")
            gray = x[:, :1].float() / 127.5 - 1.0  # RGB copies of a gray image: one channel suffices
            pad_h, pad_w = 32 - gray.shape[2], 32 - gray.shape[3]
            if pad_h < 0 or pad_w < 0:
                raise ValueError(f"the classifier takes images up to 32x32, got {tuple(gray.shape[2:])}")
            gray = F.pad(gray, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)
            features, logits = self.classifier(gray)
            out = {"penultimate": features, "logits_unbiased": logits}
            return tuple(out[name] for name in self.features_list)

    return FMNISTFeatureExtractor
