"""Training the second stage: a diffusion model in a frozen autoencoder's latent space.

The autoencoder run named in the recipe encodes the training images once; the posterior
mean and std of every image are cached to ``RUN/latents/`` (Rombach et al. 2022, Sec. 3.2:
the diffusion model never sees pixels), and each step draws ``z = mean + std * eps``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ldmkit.autoencoders.base import AutoencoderBase
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.autoencoders.task import load_autoencoder
from ldmkit.conditioning.cache import CachedTextEncoder
from ldmkit.config import to_dict
from ldmkit.data.build import DataConfig, build_dataset
from ldmkit.diffusion.model import DiffusionModel, DiffusionModelConfig
from ldmkit.diffusion.objectives import DiffusionObjectiveConfig, diffusion_loss
from ldmkit.training.config import TrainConfig
from ldmkit.training.task import Task
from ldmkit.utils.io import atomic_write_json, load_tensors, save_tensors

log = logging.getLogger("ldmkit")


@dataclass
class DiffusionRecipe:
    """A whole latent diffusion training job (``configs/diffusion/*.yaml``)."""

    run_dir: str = "runs/diffusion"
    autoencoder: str = "runs/kl_f4_shapes"  # a trained autoencoder run (or checkpoint folder)
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    objective: DiffusionObjectiveConfig = field(default_factory=DiffusionObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preview_prompts: list[str] = field(default_factory=list)  # for the periodic sample grid
    preview_steps: int = 20

    def validate(self) -> None:
        model_kind, objective_kind = self.model.parameterization, self.objective.parameterization
        if objective_kind not in (None, model_kind):
            raise ValueError(
                f"objective.parameterization is {objective_kind!r} but model.parameterization is "
                f"{model_kind!r}; leave the objective's unset: it follows the model"
            )
        self.objective = replace(self.objective, parameterization=model_kind)
        self.objective.validate()  # the checks that depend on the parameterization
        if self.data.name == "shapes" and self.data.train_size is None:
            raise ValueError("data.train_size must be set: latents are cached for a finite set")


class LatentDataset(Dataset):
    """Cached posterior moments with their captions and labels."""

    def __init__(
        self, mean: torch.Tensor, std: torch.Tensor, texts: list[str], labels: torch.Tensor
    ):
        self.mean, self.std, self.texts, self.labels = mean, std, texts, labels

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "mean": self.mean[i],
            "std": self.std[i],
            "text": self.texts[i],
            "label": self.labels[i],
        }


@torch.no_grad()
def encode_dataset(
    ae: AutoencoderBase, data: Dataset, path: Path, *, batch_size: int = 256, progress: bool = True
) -> LatentDataset:
    """Encode ``data`` once (posterior mean and std, unscaled) and cache it at ``path``."""
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        tensors = load_tensors(path)
        meta = json.loads(meta_path.read_text())
        if len(meta["texts"]) == len(data):
            return LatentDataset(tensors["mean"], tensors["std"], meta["texts"], tensors["labels"])
        log.warning("latent cache %s is stale (size changed): re-encoding", path)
    means, stds, texts, labels = [], [], [], []
    loader = DataLoader(data, batch_size=batch_size)
    for batch in tqdm(loader, desc=f"encode {path.stem}", leave=False, disable=not progress):
        if isinstance(ae, AutoencoderKL):
            post = ae.encode_posterior(batch["image"])
            means.append(post.mean)
            stds.append(post.std)
        else:  # VQ: the pre-quantization latent is deterministic
            z = ae.encode(batch["image"], scaled=False)
            means.append(z)
            stds.append(torch.zeros_like(z))
        texts += list(batch.get("text", [""] * len(batch["image"])))
        labels.append(torch.as_tensor(batch.get("label", torch.full((len(batch["image"]),), -1))))
    mean, std, label = torch.cat(means), torch.cat(stds), torch.cat(labels).long()
    save_tensors({"mean": mean, "std": std, "labels": label}, path)
    atomic_write_json(meta_path, {"texts": texts})
    return LatentDataset(mean, std, texts, label)


class DiffusionTask(Task):
    """Denoising loss on cached latents, with condition dropout for classifier-free guidance."""

    def __init__(self, recipe: DiffusionRecipe, autoencoder: AutoencoderBase, train: LatentDataset):
        self.recipe = recipe
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        model_cfg = recipe.model
        encoder = None
        if model_cfg.conditioning == "text":
            from ldmkit.conditioning.hf import load_text_encoder
            from ldmkit.conditioning.tokenizer import WordTokenizer

            spec = dict(model_cfg.text_encoder)
            if (
                spec.get("kind") == "trained"
                and spec.get("tokenizer", "word") == "word"
                and not spec.get("vocab")
            ):
                spec["vocab"] = WordTokenizer.from_texts(
                    train.texts
                ).vocab  # vocabulary of the captions
                model_cfg = replace(model_cfg, text_encoder=spec)
            encoder = load_text_encoder(spec)
            if not encoder.trainable:  # frozen: encode each caption once per run
                encoder = CachedTextEncoder(
                    encoder, Path(recipe.run_dir).expanduser() / "text_cache"
                )
        if model_cfg.conditioning == "class" and model_cfg.num_classes is None:
            model_cfg = replace(model_cfg, num_classes=int(train.labels.max()) + 1)
        self.model = DiffusionModel(model_cfg, encoder)
        self.objective = recipe.objective
        self.latent_size = list(train.mean.shape[1:])

    def latents(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """z ~ q(z|x) from the cached moments, scaled for diffusion."""
        eps = torch.randn(batch["mean"].shape, generator=generator)
        return self.autoencoder.scale_latents(batch["mean"] + batch["std"] * eps)

    def training_step(
        self, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        z = self.latents(batch, generator)
        cfg = self.model.config
        objective, null, texts = self.objective, None, batch["text"]
        if cfg.conditioning == "text":
            # Caption dropout (the null condition is the empty prompt, as in SD training).
            drop = torch.rand(len(z), generator=generator) < objective.cond_dropout
            texts = ["" if d else t for d, t in zip(drop.tolist(), texts, strict=True)]
            objective = replace(objective, cond_dropout=0.0)
        elif cfg.conditioning == "class":
            null = {"class": cfg.num_classes}
        cond = self.model.condition(texts, batch["label"])
        loss, logs = diffusion_loss(
            self.model.denoiser, z, cond, generator, objective, null_cond=null
        )
        return {"model": loss, "loss_unweighted": logs["loss_unweighted"]}

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Held-out denoising loss (fixed noise, so comparable across steps)."""
        g = torch.Generator().manual_seed(1234)
        total, n = 0.0, 0
        for batch in batches:
            z = self.latents(batch, g)
            cond = self.model.condition(batch["text"], batch["label"])
            loss, _ = diffusion_loss(
                self.model.denoiser, z, cond, g, replace(self.objective, cond_dropout=0.0)
            )
            total += loss.item() * len(z)
            n += len(z)
        return {"loss": total / max(n, 1)}

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        cfg = self.model.config
        n = min(8, len(batch["mean"]))
        prompts = self.recipe.preview_prompts or list(batch["text"][:n])
        labels = batch["label"][: len(prompts)] if cfg.conditioning == "class" else None
        cond = self.model.condition(prompts, labels)
        uncond = self.model.null_condition(len(prompts))
        shape = (len(prompts), *batch["mean"].shape[1:])
        g = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        z = self.model.sample(shape, cond, uncond, steps=self.recipe.preview_steps, generator=g)
        return self.autoencoder.decode(z).clamp(-1, 1), len(prompts)

    def export_config(self) -> dict[str, Any]:
        return {
            "kind": "diffusion",
            "config": to_dict(self.model.config),
            "latent_size": self.latent_size,
        }


def prepare_run(
    recipe: DiffusionRecipe, *, progress: bool = True
) -> tuple[AutoencoderBase, LatentDataset, LatentDataset]:
    """Copy the autoencoder into the run (self-contained) and cache the latents."""
    from ldmkit.training.checkpoint import resolve_checkpoint

    run = Path(recipe.run_dir).expanduser()
    ae_dir = run / "autoencoder"
    if not (ae_dir / "model.safetensors").is_file():
        source = resolve_checkpoint(Path(recipe.autoencoder).expanduser())
        ae_dir.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "model.json"):
            shutil.copyfile(source / name, ae_dir / name)
    ae = load_autoencoder(ae_dir)
    train = encode_dataset(
        ae, build_dataset(recipe.data, "train"), run / "latents" / "train.safetensors"
    )
    val = encode_dataset(ae, build_dataset(recipe.data, "val"), run / "latents" / "val.safetensors")
    return ae, train, val
