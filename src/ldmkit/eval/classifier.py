"""A small image classifier trained by the project, and Fréchet distances in its features.

No Inception weights exist offline, so class-conditional models are judged with a classifier
trained here: it says whether a sample shows the requested class, and its penultimate
features give a Fréchet distance (the FID formula of Heusel et al. 2017, Eq. 6, in another
feature space). The train-vs-test distance of real images is the floor to compare against.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ldmkit.utils.io import atomic_write_json, load_tensors, save_tensors


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128


class SmallClassifier(nn.Module):
    """Three conv stages (conv-GN-SiLU x2, pool) and a linear feature layer."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        layers: list[nn.Module] = []
        channels = config.in_channels
        for mult in (1, 2, 4):
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, w * mult, 3, padding=1),
                    nn.GroupNorm(8, w * mult),
                    nn.SiLU(),
                ]
                channels = w * mult
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.features_head = nn.Linear(channels, config.feature_dim)
        self.classifier = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] of images in [-1, 1]."""
        h = self.body(x).mean(dim=(2, 3))  # global average pool: any input size works
        return F.silu(self.features_head(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_classifier(
    train: Dataset,
    config: ClassifierConfig,
    *,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> SmallClassifier:
    """Train with AdamW and a one-cycle cosine schedule; data order from ``seed``."""
    torch.manual_seed(seed)
    model = SmallClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    model.train()
    with tqdm(total=total, desc="classifier", disable=not progress) as bar:
        for _ in range(epochs):
            for batch in loader:
                loss = F.cross_entropy(model(batch["image"]), batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def predict(
    model: SmallClassifier, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels [N], features [N, D]) of images in [-1, 1]."""
    labels, feats = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk)
        feats.append(f)
        labels.append(model.classifier(f).argmax(1))
    return torch.cat(labels), torch.cat(feats)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(root_a @ s_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a + s_b - 2 * cross))


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def save_classifier(model: SmallClassifier, path: str | Path, metrics: dict[str, float]) -> None:
    path = Path(path)
    save_tensors(model.state_dict(), path / "model.safetensors")
    atomic_write_json(
        path / "model.json",
        {"kind": "classifier", "config": asdict(model.config), "metrics": metrics},
    )


def load_classifier(path: str | Path) -> SmallClassifier:
    path = Path(path)
    meta = json.loads((path / "model.json").read_text())
    model = SmallClassifier(ClassifierConfig(**meta["config"]))
    model.load_state_dict(load_tensors(path / "model.safetensors"))
    return model.eval()
