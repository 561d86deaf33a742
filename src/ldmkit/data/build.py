"""Choosing a dataset from a config: bundled ``shapes``, an image folder, Fashion-MNIST, MNIST."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset


@dataclass
class DataConfig:
    """Where training images come from (the ``data:`` section of a recipe)."""

    name: Literal["shapes", "folder", "fashion_mnist", "mnist"] = "shapes"
    image_size: int = 32
    channels: int = 3  # 1 for grayscale sets; 3 repeats gray
    path: str | None = None  # image folder (name=folder) or data root override (mnist sets)
    val_path: str | None = (
        None  # folder: a separate held-out folder (else val_fraction is split off)
    )
    val_fraction: float = 0.05  # folder: share of images held out when no val_path is given
    val_size: int = 512  # held-out images used for metrics (at most)
    # shapes: number of distinct images (null = unbounded); other sets: a fixed random subset
    # of this many training images (null = all)
    train_size: int | None = None
    center_crop: bool = True  # folder: crop to square after resizing the short side
    random_flip: bool = False  # horizontal flips during training
    background: tuple[int, int, int] = (255, 255, 255)  # folder: colour under transparent pixels
    min_objects: int = 1  # shapes
    max_objects: int = 2  # shapes
    seed: int = 0  # shapes stream and folder split

    def validate(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.name == "folder" and not self.path:
            raise ValueError("name=folder needs data.path (the image folder)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def build_dataset(cfg: DataConfig, split: Literal["train", "val"]) -> Dataset:
    """The training set or the held-out set described by ``cfg``."""
    if cfg.name == "shapes":
        from ldmkit.data.shapes import ShapesDataset

        size = cfg.train_size if split == "train" else cfg.val_size
        return ShapesDataset(
            size=size,
            image_size=cfg.image_size,
            seed=cfg.seed,
            split=split,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
        )
    if cfg.name in ("fashion_mnist", "mnist"):
        from ldmkit.data.mnist import FashionMNIST, MNIST10k

        cls = FashionMNIST if cfg.name == "fashion_mnist" else MNIST10k
        data = cls(
            "train" if split == "train" else "test",
            root=cfg.path,
            pad_to=cfg.image_size,
            channels=cfg.channels,
        )
        if split == "train":
            return data if cfg.train_size is None else _first(data, cfg.train_size, cfg.seed)
        return _first(data, cfg.val_size, cfg.seed)

    def folder(root: str) -> Dataset:
        return _image_folder(root, cfg.image_size, cfg.channels, cfg.center_crop, cfg.background)

    if cfg.val_path:
        return folder(cfg.path if split == "train" else cfg.val_path)
    full = folder(cfg.path)
    n_val = max(1, round(len(full) * cfg.val_fraction))
    if len(full) < 2:
        raise ValueError(f"{cfg.path}: need at least 2 images to hold one out, found {len(full)}")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    if split == "train":
        train = Subset(full, perm[n_val:])
        return train if cfg.train_size is None else _first(train, cfg.train_size, cfg.seed)
    return _first(Subset(full, perm[:n_val]), cfg.val_size, cfg.seed)


@lru_cache(maxsize=4)
def _image_folder(
    root: str, size: int, channels: int, center_crop: bool, background: tuple[int, int, int]
) -> Dataset:
    """One scan (and bad-file report) per folder, shared by the train and held-out splits."""
    from ldmkit.data.folder import ImageFolderDataset

    return ImageFolderDataset(
        root, size, channels=channels, center_crop=center_crop, background=background
    )


def _first(data: Dataset, n: int, seed: int) -> Dataset:
    """A fixed random subset of at most ``n`` items, in their original order."""
    if len(data) <= n:
        return data
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))
    return Subset(data, sorted(perm[:n].tolist()))


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image horizontally with probability 1/2 (draws from ``generator``)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)
