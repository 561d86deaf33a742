"""``ldmkit eval diffusion``: prompt adherence of a text-to-image run on ``shapes``.

Prompts are drawn with ``ldmkit.data.shapes.make_prompts`` (a seed of their own, not the
training stream), one and two objects, and the pixel-only verifier judges every sample.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from ldmkit.data.shapes import make_prompts
from ldmkit.eval.shapes_verifier import adherence
from ldmkit.pipelines import LatentDiffusionPipeline, load_pipeline
from ldmkit.utils.io import atomic_write_json

PROMPT_SEED = 12345  # evaluation prompts: fixed, and apart from the data stream's seeds


def shapes_adherence(
    pipe: LatentDiffusionPipeline,
    n: int = 256,
    *,
    num_objects: int = 1,
    seed: int = 0,
    progress: bool = False,
    **sample: Any,
) -> dict[str, float]:
    """Verifier adherence of ``n`` samples for ``n`` fresh ``num_objects``-object prompts."""
    prompts = make_prompts(n, seed=PROMPT_SEED + num_objects, num_objects=num_objects)
    images = pipe(prompts, seed=seed, output="tensor", progress=progress, **sample)
    return adherence(images, prompts)


def evaluate_diffusion(
    run: str | Path,
    *,
    n: int | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    classifier: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a diffusion run and write RUN/eval.json.

    Text-to-image on ``shapes``: verifier adherence for 1- and 2-object prompts (``n`` each,
    default 256). Class-conditional runs on a labelled set: recognition by ``classifier`` (a
    folder from ``ldmkit train classifier``) and Fréchet distances (``n`` samples per class,
    default 100); see ``ldmkit.eval.class_conditional``.
    """
    run = Path(run)
    recipe_path = run / "config.yaml"
    data = yaml.safe_load(recipe_path.read_text()).get("data", {}) if recipe_path.is_file() else {}
    pipe = load_pipeline(run)
    options = {"steps": steps, "sampler": sampler, "guidance": guidance}
    if pipe.config.conditioning == "class":
        if classifier is None:
            raise ValueError(
                "a class-conditional run is judged by a classifier: pass --classifier DIR "
                "(train one with `ldmkit train classifier configs/classifier/...`)"
            )
        from ldmkit.config import from_dict
        from ldmkit.data.build import DataConfig
        from ldmkit.eval.class_conditional import evaluate_class_conditional

        return evaluate_class_conditional(
            run, pipe, from_dict(DataConfig, data), classifier, n_per_class=n, seed=seed, **options
        )
    if data.get("name", "shapes") != "shapes" or pipe.config.conditioning != "text":
        raise ValueError(
            f"{run} was trained on {data.get('name')!r}: automatic evaluation covers shapes "
            "text-to-image and class-conditional runs (with --classifier)"
        )
    n = n or 256
    started = time.perf_counter()
    result: dict[str, Any] = {
        "n_per_group": n,
        "steps": steps or pipe.config.steps,
        "sampler": sampler or pipe.config.sampler,
        "guidance": pipe.config.guidance if guidance is None else guidance,
    }
    for k in (1, 2):
        result[f"{k}_object"] = shapes_adherence(
            pipe, n, num_objects=k, seed=seed, progress=True, **options
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    if recipe_path.is_file():
        atomic_write_json(run / "eval.json", result)
    return result
