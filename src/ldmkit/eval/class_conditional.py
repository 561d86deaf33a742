"""Judging class-conditional models with a classifier trained by the project.

``ldmkit train classifier RECIPE`` trains ``SmallClassifier`` on a labelled dataset and records
its test accuracy; ``ldmkit eval diffusion RUN --classifier DIR`` samples every class of a
class-conditional run and reports how often the classifier recognises the requested class and
the Fréchet distance of the samples to the test set in the classifier's feature space, next to
the train-vs-test distance of real images at the same sample count (the floor).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ldmkit.config import load_config, save_yaml, to_dict
from ldmkit.data.build import DataConfig, build_dataset
from ldmkit.eval.classifier import (
    ClassifierConfig,
    frechet_distance,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from ldmkit.pipelines import LatentDiffusionPipeline
from ldmkit.utils.io import atomic_write_json

log = logging.getLogger("ldmkit")


@dataclass
class ClassifierRecipe:
    """``configs/classifier/*.yaml``: data, network and optimisation of a judge classifier."""

    run_dir: str = "runs/classifier"
    data: DataConfig = field(default_factory=lambda: DataConfig(name="fashion_mnist"))
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def validate(self) -> None:
        if self.data.name not in ("fashion_mnist", "mnist"):
            raise ValueError("a judge classifier needs a labelled set: fashion_mnist or mnist")
        if self.model.in_channels != self.data.channels:
            raise ValueError(
                f"model.in_channels={self.model.in_channels} but data.channels={self.data.channels}"
            )


def _images_labels(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for batch in DataLoader(data, batch_size=512):
        images.append(batch["image"])
        labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(images), torch.cat(labels)


def train_judge(
    config: str | Path | None, overrides: list[str] | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Train, test on the whole test split and save to ``run_dir``; returns the metrics."""
    recipe = load_config(ClassifierRecipe, config, overrides)
    recipe.validate()
    started = time.perf_counter()
    model = train_classifier(
        build_dataset(recipe.data, "train"),
        recipe.model,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        progress=progress,
    )
    test_images, test_labels = _images_labels(build_dataset(recipe.data, "val"))
    predicted, _ = predict(model, test_images)
    metrics = {
        "test_accuracy": float((predicted == test_labels).float().mean()),
        "test_images": len(test_labels),
        "seconds": round(time.perf_counter() - started, 1),
    }
    run = Path(recipe.run_dir).expanduser()
    save_classifier(model, run, metrics)
    save_yaml(to_dict(recipe), run / "config.yaml")
    return metrics


@torch.no_grad()
def class_conditional_metrics(
    pipe: LatentDiffusionPipeline,
    classifier_dir: str | Path,
    data: DataConfig,
    *,
    n_per_class: int = 100,
    seed: int = 0,
    **sample: Any,
) -> dict[str, Any]:
    """Recognition rate, per-class recognition and Fréchet distances of ``pipe``'s samples.

    ``data`` names the labelled set; its whole test split is the reference, and as many
    training images as there are samples give the floor ``fd_train_vs_test``.
    """
    if data.name not in ("fashion_mnist", "mnist"):
        raise ValueError(f"class-conditional evaluation needs a labelled set, not {data.name!r}")
    classifier = load_classifier(classifier_dir)
    num_classes = pipe.config.num_classes
    if num_classes is None or pipe.config.conditioning != "class":
        raise ValueError("this run is not class-conditional")
    if classifier.config.num_classes != num_classes:
        raise ValueError(
            f"classifier has {classifier.config.num_classes} classes, the model {num_classes}"
        )
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    samples = pipe(class_labels=labels.tolist(), seed=seed, output="tensor", **sample)
    predicted, features = predict(classifier, samples.float().clamp(-1, 1))
    correct = predicted == labels

    test_images, _ = _images_labels(build_dataset(_all_of(data), "val"))
    _, test_features = predict(classifier, test_images)
    train_images, _ = _images_labels(
        _random_subset(build_dataset(data, "train"), len(labels), seed)
    )
    _, train_features = predict(classifier, train_images)
    return {
        "recognition": float(correct.float().mean()),
        "recognition_per_class": [float(c.float().mean()) for c in correct.split(n_per_class)],
        "fd": frechet_distance(features, test_features),
        "fd_train_vs_test": frechet_distance(train_features, test_features),
        "n_samples": len(labels),
        "n_test": len(test_images),
    }


def _all_of(data: DataConfig) -> DataConfig:
    """The same data with the whole held-out split (not just ``val_size`` images)."""
    return replace(data, val_size=10**9)


def _random_subset(data: Dataset, n: int, seed: int) -> Dataset:
    """``n`` items of ``data`` drawn at random (without replacement) from ``seed``."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return Subset(data, order[:n].tolist())


def evaluate_class_conditional(
    run: str | Path,
    pipe: LatentDiffusionPipeline,
    data: DataConfig,
    classifier: str | Path,
    *,
    n_per_class: int | None = None,
    seed: int = 0,
    **sample: Any,
) -> dict[str, Any]:
    """``class_conditional_metrics`` with the sampling settings, written to RUN/eval.json."""
    started = time.perf_counter()
    result: dict[str, Any] = {
        "classifier": str(classifier),
        "steps": sample.get("steps") or pipe.config.steps,
        "sampler": sample.get("sampler") or pipe.config.sampler,
        "guidance": pipe.config.guidance if sample.get("guidance") is None else sample["guidance"],
    }
    result.update(
        class_conditional_metrics(
            pipe, classifier, data, n_per_class=n_per_class or 100, seed=seed, **sample
        )
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(Path(run) / "eval.json", result)
    return result
