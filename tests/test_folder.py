"""Tests for ldmkit.data.folder and ldmkit.data.transforms."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ldmkit.data.folder import DatasetError, ImageFolderDataset
from ldmkit.data.transforms import load_image, make_grid, resize_and_crop, to_pil, to_tensor


def noise(size=(16, 16), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def save_truncated(img: Image.Image, path, fmt: str) -> None:
    img.save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_metadata(root, entries) -> None:
    lines = [e if isinstance(e, str) else json.dumps(e) for e in entries]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_modes_labels_and_item_format(tmp_path):
    (tmp_path / "b_gray").mkdir()
    (tmp_path / "a_rgb").mkdir()
    (tmp_path / "c_alpha").mkdir()
    noise().save(tmp_path / "a_rgb" / "x.png")
    noise(size=(20, 12)).save(tmp_path / "a_rgb" / "y.jpg", quality=90)
    noise(mode="L").save(tmp_path / "b_gray" / "x.bmp")
    Image.new("RGBA", (16, 16), (10, 20, 30, 100)).save(tmp_path / "c_alpha" / "x.png")
    noise().convert("P").save(tmp_path / "c_alpha" / "p.gif")

    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.class_names == ["a_rgb", "b_gray", "c_alpha"]
    assert len(ds) == 5 and ds.skipped == []
    assert [ds[i]["label"] for i in range(len(ds))] == [0, 0, 1, 2, 2]
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"image", "text", "label"}
        assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() <= item["image"].max() <= 1.0
        assert item["text"] == ""
    gray = ImageFolderDataset(tmp_path, image_size=8, channels=1)
    assert gray[0]["image"].shape == (1, 8, 8)


def test_flat_folder_has_no_labels(tmp_path):
    noise().save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    noise().save(tmp_path / "sub" / "b.png")
    noise().save(tmp_path / ".hidden.png")  # hidden files are ignored
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert len(ds) == 2 and ds.class_names == []
    assert [ds[i]["label"] for i in range(2)] == [-1, -1]


def test_rgba_composited_on_background(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png", background=(0, 0, 255))
    # alpha 128/255: red 255 * a = 128, blue 255 * (1 - a) = 127
    np.testing.assert_allclose(np.asarray(img)[0, 0], [128, 0, 127], atol=1)
    ds = ImageFolderDataset(tmp_path, image_size=8, background=(0, 0, 255))
    expected = torch.tensor([128, 0, 127]) / 127.5 - 1
    torch.testing.assert_close(ds[0]["image"][:, 3, 3], expected, atol=1 / 127.5, rtol=0)
    # fully transparent -> exactly the background; default background is white
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "b.png")
    assert np.asarray(load_image(tmp_path / "b.png"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(tmp_path / "b.png", channels=1, background=0))[0, 0] == 0


def test_palette_transparency_and_16bit(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([200, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png", background=(1, 2, 3))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 200, 0) and img.getpixel((1, 1)) == (1, 2, 3)
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(load_image(deep, channels=1)).tolist() == [[0, 128, 255]]


def test_metadata_captions(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    for name in ("a", "b", "c"):
        noise().save(tmp_path / "imgs" / f"{name}.png")
    write_metadata(
        tmp_path,
        [
            {"file_name": "imgs/a.png", "text": "an apple"},
            "",
            {"file_name": "imgs/b.png", "text": "a b"},
        ],
    )
    (tmp_path / "imgs" / "a.txt").write_text("ignored sidecar")
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        ds = ImageFolderDataset(tmp_path, image_size=8)
    assert [ds[i]["text"] for i in range(3)] == ["an apple", "a b", ""]
    assert "imgs/c.png" in caplog.text and "empty caption" in caplog.text
    sidecar = ImageFolderDataset(tmp_path, image_size=8, captions="sidecar")
    assert [sidecar[i]["text"] for i in range(3)] == ["ignored sidecar", "", ""]
    assert ImageFolderDataset(tmp_path, image_size=8, captions="none")[0]["text"] == ""


def test_sidecar_captions_auto(tmp_path):
    noise().save(tmp_path / "cat.png")
    noise().save(tmp_path / "dog.jpg")
    (tmp_path / "cat.txt").write_text("a cat\n")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert [ds[i]["text"] for i in range(2)] == ["a cat", ""]
    with pytest.raises(DatasetError, match="metadata.jsonl does not exist"):
        ImageFolderDataset(tmp_path, captions="metadata")


def test_bad_files_skipped_and_reported_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # must not hide truncation
    noise().save(tmp_path / "good.png")
    save_truncated(noise((64, 64)), tmp_path / "trunc.png", "PNG")
    save_truncated(noise((64, 64)), tmp_path / "trunc.jpg", "JPEG")
    (tmp_path / "text.png").write_text("this is not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.md").write_text("not a candidate")
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the check
    assert len(ds) == 1 and ds.files[0].name == "good.png"
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in ds.skipped) == [
        "empty.jpg", "text.png", "trunc.jpg", "trunc.png",
    ]  # fmt: skip
    records = [r for r in caplog.records if r.name == "ldmkit.data"]
    assert len(records) == 1 and "Skipped 4" in records[0].getMessage()
    for name in ("empty.jpg", "text.png", "trunc.jpg", "trunc.png"):
        assert name in records[0].getMessage()
    assert ds[0]["image"].shape == (3, 8, 8)


def test_many_skipped_paths_are_abbreviated(tmp_path, caplog):
    noise().save(tmp_path / "good.png")
    for i in range(25):
        (tmp_path / f"bad{i:02d}.png").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        ds = ImageFolderDataset(tmp_path, image_size=8)
    assert len(ds.skipped) == 25 and "... and 5 more" in caplog.text


def test_unreadable_at_load_time_falls_back(tmp_path, caplog):
    noise().save(tmp_path / "a.png")
    (tmp_path / "b.png").write_text("garbage")
    noise(seed=1).save(tmp_path / "c.png")
    ds = ImageFolderDataset(tmp_path, image_size=8, verify=False)
    assert len(ds) == 3
    with caplog.at_level(logging.WARNING, logger="ldmkit.data"):
        item = ds[1]
        ds[1]
    torch.testing.assert_close(item["image"], ds[2]["image"])
    assert len(caplog.records) == 1 and "b.png" in caplog.text


def test_cache(tmp_path):
    noise().save(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path, image_size=8, cache=True)
    expected = ds[0]["image"].clone()
    (tmp_path / "a.png").unlink()  # served from memory now
    ds[0]["image"].fill_(0.0)  # must not corrupt the cache
    torch.testing.assert_close(ds[-1]["image"], expected)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "not a directory"),
        (lambda p: p, r"saw 0 file\(s\)"),
    ],
)
def test_root_errors(tmp_path, setup, match):
    with pytest.raises(DatasetError, match=match):
        ImageFolderDataset(setup(tmp_path))


def test_only_bad_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    (tmp_path / "c.txt").write_text("caption")
    with pytest.raises(DatasetError, match=r"saw 3 file\(s\), 2 with an image .* 2 skipped"):
        ImageFolderDataset(tmp_path)


def test_metadata_errors(tmp_path):
    noise().save(tmp_path / "a.png")
    write_metadata(tmp_path, [{"file_name": "a.png", "text": "x"}, "{not json"])
    with pytest.raises(DatasetError, match="line 2: invalid JSON"):
        ImageFolderDataset(tmp_path)
    write_metadata(tmp_path, [{"file_name": "a.png"}])
    with pytest.raises(DatasetError, match="line 1: missing key.*text"):
        ImageFolderDataset(tmp_path)
    names = [f"gone{i}.png" for i in range(22)]
    write_metadata(tmp_path, [{"file_name": n, "text": ""} for n in ["a.png", *names]])
    with pytest.raises(DatasetError, match=r"22 file\(s\) that do not exist") as err:
        ImageFolderDataset(tmp_path)
    assert "gone0.png" in str(err.value) and "... and 2 more" in str(err.value)


def test_metadata_images_all_skipped(tmp_path):
    noise().save(tmp_path / "unlisted.png")
    (tmp_path / "bad.png").write_bytes(b"")
    write_metadata(tmp_path, [{"file_name": "bad.png", "text": "x"}])
    with pytest.raises(DatasetError, match="named in .* unreadable"):
        ImageFolderDataset(tmp_path)


def test_resize_and_crop_geometry():
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20, 0] = 255  # red | green | blue thirds
    arr[:, 20:40, 1] = 255
    arr[:, 40:, 2] = 255
    img = Image.fromarray(arr)
    crop = np.asarray(resize_and_crop(img, 10))
    assert crop.shape == (10, 10, 3)
    inner = crop[:, 1:-1]  # bicubic support reaches a little past the crop box at the edges
    assert (inner[..., 1] > 250).all() and (inner[..., [0, 2]] < 5).all()
    assert (crop[..., 1] > 200).all()
    squash = np.asarray(resize_and_crop(img, 10, center_crop=False))
    assert squash.shape == (10, 10, 3)
    assert squash[5, 0].tolist() == [255, 0, 0] and squash[5, 9].tolist() == [0, 0, 255]
    tall = resize_and_crop(Image.new("RGB", (30, 90)), 12)
    assert tall.size == (12, 12)


def test_make_grid():
    images = torch.full((5, 3, 8, 8), 1.0)
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2) and grid.mode == "RGB"
    arr = np.asarray(grid)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[2, 2].tolist() == [255, 255, 255]
    assert arr[15, 25].tolist() == [0, 0, 0]  # the missing sixth tile stays padding
    assert make_grid(torch.zeros(2, 1, 4, 4), nrow=4, padding=0).size == (8, 4)


def test_tensor_round_trip():
    for mode in ("RGB", "L"):
        img = noise((7, 5), mode=mode)
        x = to_tensor(img)
        assert x.shape == ((3 if mode == "RGB" else 1), 5, 7) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        back = to_pil(x)
        assert back.mode == mode and np.array_equal(np.asarray(back), np.asarray(img))
    assert to_tensor(Image.new("L", (1, 1), 255)).item() == 1.0
    assert np.asarray(to_pil(torch.tensor([[[-3.0]]])))[0, 0] == 0  # clipped
