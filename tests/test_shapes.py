"""Tests for the ``shapes`` dataset and its pixel-only verifier."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.shapes import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    SHAPES,
    ShapeObject,
    ShapesDataset,
    caption,
    make_prompts,
    parse_caption,
    render,
    sample_jitter,
    sample_objects,
)
from ldmkit.eval.shapes_verifier import UNKNOWN, adherence, detect, verify

ALL_OBJECTS = [ShapeObject(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def _dataset_items(n_per_size: int) -> list[tuple[torch.Tensor, str, list[ShapeObject]]]:
    """(image, caption, objects) for 1-2 object jittered images at sizes 32 and 64."""
    items = []
    for image_size in (32, 64):
        ds = ShapesDataset(size=n_per_size, image_size=image_size, seed=7, split="val")
        items += [(ds[i]["image"], ds[i]["text"], ds.objects(i)) for i in range(n_per_size)]
    return items


@pytest.fixture(scope="module")
def items() -> list[tuple[torch.Tensor, str, list[ShapeObject]]]:
    return _dataset_items(300)


# --- vocabulary and captions ---------------------------------------------------------------


def test_vocabulary() -> None:
    assert len(COLORS) >= 6
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert sorted(POSITIONS.values()) == [(r, c) for r in range(3) for c in range(3)]
    palette = np.asarray(list(COLORS.values()), dtype=float)
    pairwise = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert pairwise[~np.eye(len(palette), dtype=bool)].min() >= 60
    assert np.linalg.norm(palette - np.asarray(BACKGROUND), axis=1).min() >= 150


def test_caption_example() -> None:
    objects = [ShapeObject("red", "circle", "top left"), ShapeObject("blue", "square", "center")]
    assert caption(objects) == "a red circle at the top left and a blue square in the center"
    assert caption([ShapeObject("orange", "triangle", "left")]) == "an orange triangle on the left"


def test_caption_round_trip_all_combinations() -> None:
    for obj in ALL_OBJECTS:
        assert parse_caption(caption([obj])) == [obj]
    for pair in itertools.product(ALL_OBJECTS, repeat=2):
        assert parse_caption(caption(pair)) == list(pair)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle",
        "a pink circle at the top left",
        "an red circle at the top left",
        "a red circle in the top left",
        "a red circle at the top left and",
        "a red circle at the top left, a blue square in the center",
        "A red circle at the top left",
        "a red circle at the top left ",
    ],
)
def test_parse_rejects_invalid_caption(text: str) -> None:
    with pytest.raises(ValueError, match="not a valid shapes caption"):
        parse_caption(text)


def test_bad_names_raise() -> None:
    with pytest.raises(ValueError, match="unknown color 'pink'.*red"):
        ShapeObject("pink", "circle", "center")
    with pytest.raises(ValueError, match="unknown shape 'star'.*circle"):
        ShapeObject("red", "star", "center")
    with pytest.raises(ValueError, match="unknown position 'middle'.*top left"):
        ShapeObject("red", "circle", "middle")
    with pytest.raises(ValueError):
        caption([])
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="dev")


# --- sampling, rendering and the dataset ---------------------------------------------------


@pytest.mark.parametrize("make_generator", [np.random.default_rng, torch.Generator().manual_seed])
def test_sample_objects(make_generator) -> None:
    generator = make_generator(3)
    counts = set()
    for _ in range(200):
        objects = sample_objects(generator, min_objects=1, max_objects=3)
        counts.add(len(objects))
        assert len({o.position for o in objects}) == len(objects)
    assert counts == {1, 2, 3}
    assert sample_objects(make_generator(5), 2, 2) == sample_objects(make_generator(5), 2, 2)


@pytest.mark.parametrize("image_size", [16, 32, 64, 128])
def test_render(image_size: int) -> None:
    objects = [ShapeObject("green", "square", "center")]
    image = render(objects, image_size, jitter=sample_jitter(np.random.default_rng(0), 1))
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == BACKGROUND
    assert tuple(image[image_size // 2, image_size // 2]) == COLORS["green"]
    # A square fills ~(0.75 * cell)^2 of its cell, i.e. ~1/16 of the image.
    coverage = (np.abs(image.astype(int) - BACKGROUND).sum(-1) > 0).mean()
    assert 0.04 < coverage < 0.09
    with pytest.raises(ValueError):
        render(objects, 8)


@pytest.mark.parametrize("image_size", [32, 64])
def test_item_format(image_size: int) -> None:
    ds = ShapesDataset(size=20, image_size=image_size)
    for i in range(20):
        item = ds[i]
        image = item["image"]
        assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
        assert image.is_contiguous()
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert parse_caption(item["text"]) == ds.objects(i)
        assert 1 <= len(ds.objects(i)) <= 2


def test_length_semantics() -> None:
    assert len(ShapesDataset()) == 2**31 - 1
    ShapesDataset()[2**31 - 2]  # any index of the infinite dataset works
    ds = ShapesDataset(size=10)
    assert len(ds) == 10
    assert torch.equal(ds[-1]["image"], ds[9]["image"])
    with pytest.raises(IndexError):
        ds[10]


def test_determinism_and_splits() -> None:
    forward = [ShapesDataset(size=50)[i] for i in range(50)]
    ds = ShapesDataset(size=50)
    backward = {i: ds[i] for i in reversed(range(50))}
    for i, item in enumerate(forward):
        assert torch.equal(item["image"], backward[i]["image"])
        assert item["text"] == backward[i]["text"]
    captions = {
        split: [ShapesDataset(split=split)[i]["text"] for i in range(50)]
        for split in ("train", "val", "test")
    }
    assert captions["train"] != captions["val"] != captions["test"] != captions["train"]
    assert captions["train"] != [ShapesDataset(seed=1)[i]["text"] for i in range(50)]


def test_jitter_flag() -> None:
    plain = ShapesDataset(jitter=False)
    expected = torch.from_numpy(render(plain.objects(0))).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(plain[0]["image"], expected, atol=1e-6)
    assert ShapesDataset(jitter=True)[0]["text"] == plain[0]["text"]


def test_make_prompts() -> None:
    prompts = make_prompts(20, seed=1, num_objects=2)
    assert prompts == make_prompts(20, seed=1, num_objects=2)
    assert all(len(parse_caption(p)) == 2 for p in prompts)
    assert len(set(prompts)) > 10


# --- verifier -------------------------------------------------------------------------------


def test_verifier_accuracy_on_dataset(items) -> None:
    assert len(items) >= 500
    assert {len(objects) for _, _, objects in items} == {1, 2}
    scores = adherence([image for image, _, _ in items], [text for _, text, _ in items])
    assert scores["n"] == len(items)
    assert scores["accuracy"] >= 0.99
    for key in ("object_accuracy", "color_accuracy", "shape_accuracy", "position_accuracy"):
        assert scores[key] >= 0.99
    assert scores["mean_extra"] <= 0.01


def _perturb(objects: list[ShapeObject], attribute: str, rng: np.random.Generator) -> str:
    """Caption with one object's ``attribute`` changed so that the caption is false."""
    k = int(rng.integers(len(objects)))
    obj = objects[k]
    if attribute == "color":
        new = ShapeObject(
            rng.choice([c for c in COLORS if c != obj.color]), obj.shape, obj.position
        )
    elif attribute == "shape":
        new = ShapeObject(
            obj.color, rng.choice([s for s in SHAPES if s != obj.shape]), obj.position
        )
    else:  # move it to a cell that no object occupies
        used = {o.position for o in objects}
        new = ShapeObject(obj.color, obj.shape, rng.choice([p for p in POSITIONS if p not in used]))
    return caption([new if i == k else o for i, o in enumerate(objects)])


@pytest.mark.parametrize("attribute", ["color", "shape", "position"])
def test_verifier_rejects_wrong_captions(items, attribute: str) -> None:
    rng = np.random.default_rng(0)
    rejected = [
        not verify(image, _perturb(objs, attribute, rng)).correct for image, _, objs in items
    ]
    assert np.mean(rejected) >= 0.99


def test_verifier_robust_to_noise(items) -> None:
    generator = torch.Generator().manual_seed(0)
    noisy = [
        # sigma 0.03 in [0, 1] units is 0.06 in [-1, 1] units.
        (image + 0.06 * torch.randn(image.shape, generator=generator)).clamp(-1, 1)
        for image, _, _ in items
    ]
    assert adherence(noisy, [text for _, text, _ in items])["accuracy"] >= 0.97


def test_blank_image_is_rejected() -> None:
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    assert detect(blank) == []
    result = verify(blank, "a red circle in the center")
    assert not result.correct and result.objects[0][1] is False and result.extra == 0


def test_verify_result_and_input_types() -> None:
    objects = [ShapeObject("yellow", "triangle", "bottom right")]
    pixels = render(objects + [ShapeObject("blue", "circle", "top")], 32)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    for image in (pixels, Image.fromarray(pixels), tensor):
        result = verify(image, caption(objects))
        assert result.correct and result.objects == [(objects[0], True)] and result.extra == 1
    with pytest.raises(ValueError):
        verify(pixels.astype(np.float32), caption(objects))


def test_off_vocabulary_blobs_are_unknown() -> None:
    yy, xx = np.mgrid[:64, :64] + 0.5
    grey = render([ShapeObject("red", "square", "center")], 64)
    grey[grey[..., 1] < 200] = (120, 120, 120)
    assert [(d.color, d.shape) for d in detect(grey)] == [(UNKNOWN, "square")]
    ellipse = ((yy - 32) / 4) ** 2 + ((xx - 32) / 9) ** 2 <= 1  # 2:1 wide ellipse
    image = np.where(ellipse[..., None], COLORS["blue"], BACKGROUND).astype(np.uint8)
    assert [(d.color, d.shape) for d in detect(image)] == [("blue", UNKNOWN)]


def test_adherence_counts_partial_errors() -> None:
    image = render([ShapeObject("red", "circle", "left"), ShapeObject("blue", "square", "top")])
    wrong = "a red square on the left and a green square at the bottom"
    scores = adherence([image], [wrong])
    assert scores["accuracy"] == 0.0 and scores["object_accuracy"] == 0.0
    assert scores["color_accuracy"] == 0.5  # red on the left; nothing at the bottom
    assert scores["shape_accuracy"] == 0.0
    assert scores["position_accuracy"] == 0.5
    assert scores["mean_extra"] == 1.0 and scores["n"] == 1.0
