from dataclasses import dataclass, field
from typing import Literal

import pytest

from ldmkit.autoencoders.task import AutoencoderRecipe
from ldmkit.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from ldmkit.diffusion.task import DiffusionRecipe
from ldmkit.training.config import TrainConfig


@dataclass
class Inner:
    size: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    rate: float = 0.5
    dims: tuple[int, ...] = (1, 2)
    pair: tuple[float, float] = (0.0, 1.0)
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_round_trip_and_conversion():
    cfg = from_dict(Outer, {"rate": 2, "dims": [3, 4, 5], "inner": {"mode": "b"}})
    assert cfg.rate == 2.0 and isinstance(cfg.rate, float)
    assert cfg.dims == (3, 4, 5) and cfg.inner.mode == "b"
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"inner\.sise: unknown key; allowed: mode, size"):
        from_dict(Outer, {"inner": {"sise": 3}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rate": "fast"}, r"rate: expected a number"),
        ({"inner": {"size": 1.5}}, r"inner\.size: expected an integer"),
        ({"inner": {"size": True}}, r"inner\.size: expected an integer"),
        ({"inner": {"mode": "c"}}, r"inner\.mode: 'c' is not one of 'a', 'b'"),
        ({"pair": [1.0]}, r"pair: expected 2 items"),
        ({"name": None}, r"name: expected a string, got None"),
        ({"inner": 3}, r"inner: expected a mapping"),
    ],
)
def test_wrong_types_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_overrides_parse_yaml_values():
    data = apply_overrides(
        {}, ["inner.size=7", "rate=1e-4", "path=null", "dims=[8, 9]", "name=abc"]
    )
    cfg = from_dict(Outer, data)
    assert (cfg.inner.size, cfg.rate, cfg.path, cfg.dims, cfg.name) == (
        7,
        1e-4,
        None,
        (8, 9),
        "abc",
    )
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["rate"])
    with pytest.raises(ConfigError, match="name: is a value"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_recipe_files_load_and_validate(tmp_path):
    import glob

    files = sorted(glob.glob("configs/**/*.yaml", recursive=True))
    assert files, "no recipes found in configs/"
    for path in files:
        if "/classifier/" in path:
            from ldmkit.eval.class_conditional import ClassifierRecipe

            load_config(ClassifierRecipe, path).validate()
        elif "/diffusion/" in path or path.endswith("demo/t2i.yaml"):
            recipe = load_config(DiffusionRecipe, path, ["data.path=/tmp"])
            assert recipe.objective.parameterization == recipe.model.parameterization
        else:
            recipe = load_config(AutoencoderRecipe, path, ["data.path=/tmp"])
            assert recipe.loss.kind == recipe.model.kind
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        load_config(AutoencoderRecipe, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(AutoencoderRecipe, tmp_path / "missing.yaml")


def test_recipe_cross_checks():
    with pytest.raises(ConfigError, match="model.in_channels=3 but data.channels=1"):
        from_dict(AutoencoderRecipe, {"data": {"channels": 1}})
    with pytest.raises(ConfigError, match="not a multiple of f=4"):
        from_dict(AutoencoderRecipe, {"data": {"image_size": 30}})
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        from_dict(TrainConfig, {"batch_size": 0})


def test_lr_schedule():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_decay="cosine", min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.55)
    assert cfg.lr_at(110) == pytest.approx(0.1)
    lin = TrainConfig(steps=100, lr=2.0, lr_decay="linear")
    assert lin.lr_at(50) == pytest.approx(1.0)
