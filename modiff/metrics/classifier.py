"""A Fashion-MNIST classifier whose features stand in for Inception's on this data.

Input: (B, 1, 32, 32) in [-1, 1] (the model range) -> (penultimate (B, 128), logits (B, 10)).
Three conv stages (32, 64, 128 channels, two 3x3 convs with BatchNorm and ReLU each, 2x2 max pooling),
then 2048 -> 128 (BatchNorm, ReLU: the feature layer) -> 10.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from modiff.utils.checksums import add_checksums, load_checked
from modiff.utils.runs import atomic_path, environment, write_json
from modiff.utils.progress import progress_bar
from modiff.utils.paths import data_dir

__all__ = ["FMNISTClassifier", "ClassifierTrainConfig", "train_classifier", "load_classifier", "accuracy", "FEATURE_DIM"]

log = logging.getLogger(__name__)

FEATURE_DIM = 128


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FMNISTClassifier(nn.Module):
    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(_stage(1, 32), _stage(32, 64), _stage(64, 128), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(128 * 4 * 4, FEATURE_DIM, bias=False), nn.BatchNorm1d(FEATURE_DIM), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(self.features(x))
        return features, self.head(self.dropout(features))


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0


def accuracy(model: FMNISTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy on (N, 1, 32, 32) images in [-1, 1]."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            _, logits = model(images[i : i + batch_size])
            correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (background-padded)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    return torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), shifts=(dy, dx), dims=(2, 3))[..., 2:-2, 2:-2]


def train_classifier(config: ClassifierTrainConfig, out_dir: Path, data_dir: Optional[Path] = None) -> float:
    """Train on the 60k training images, write weights + manifest; returns test accuracy.

    Runs on the CPU in bf16 autocast (channels_last), which CPUs with bf16 units run faster than float32.
    """
    from modiff.datasets import fashion_mnist

    train_x, train_y = fashion_mnist("train", data_dir)
    test_x, test_y = fashion_mnist("test", data_dir)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = FMNISTClassifier().to(memory_format=torch.channels_last)
    steps_per_epoch = len(train_x) // config.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    start = time.time()
    for epoch in progress_bar(range(config.epochs), "train classifier"):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            with torch.random.fork_rng(devices=[]), torch.autocast("cpu", dtype=torch.bfloat16):
                torch.manual_seed(config.seed * 100_003 + epoch * steps_per_epoch + i)  # dropout masks
                _, logits = model(_augment(train_x[idx], generator).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log.info("epoch %d: loss %.4f", epoch, float(loss))
    test_accuracy = accuracy(model, test_x, test_y)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json({"config": asdict(config), "test_accuracy": test_accuracy, "train_seconds": round(time.time() - start, 1),
                "environment": environment("cpu")}, out_dir / "manifest.json")
    add_checksums(out_dir, ["model.safetensors"])
    return test_accuracy


def load_classifier(folder: Optional[Path] = None) -> FMNISTClassifier:
    """The shipped classifier (data/fmnist-classifier) or one trained into `folder`, in eval mode."""
    folder = folder or data_dir() / "fmnist-classifier"
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights missing: {path}; train them with `modiff train classifier`")
    model = FMNISTClassifier()
    model.load_state_dict(load_checked(folder, "model.safetensors"))
    return model.eval()
