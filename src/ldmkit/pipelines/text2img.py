"""Text-to-image (and class-to-image) sampling with a trained latent diffusion run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ldmkit.accel.prepack import prepack
from ldmkit.autoencoders.base import AutoencoderBase
from ldmkit.autoencoders.task import load_autoencoder
from ldmkit.config import from_dict
from ldmkit.data.transforms import to_pil
from ldmkit.diffusion.model import DiffusionModel, DiffusionModelConfig
from ldmkit.training.checkpoint import load_model_files, resolve_checkpoint


class LatentDiffusionPipeline:
    """``pipe(prompts, steps=30, sampler="dpmpp_2m", guidance=4.0, seed=0) -> [PIL images]``.

    Image ``k`` of a call is drawn from its own CPU generator seeded ``seed + k``, so the
    same seed gives the same image whatever the batch size or device.
    """

    def __init__(
        self, model: DiffusionModel, autoencoder: AutoencoderBase, latent_size: tuple[int, ...]
    ):
        # weights packed for oneDNN at the first CPU call (ldmkit.accel.prepack; exact)
        self.model = prepack(model.eval())
        self.autoencoder = prepack(autoencoder.eval())
        self.latent_size = latent_size  # (C, H, W) of the training latents
        self._decode: Callable[[torch.Tensor], torch.Tensor] = self.autoencoder.decode

    def compile(
        self,
        *,
        dynamic: bool = True,
        freeze: bool = True,
        decoder: bool = True,
        backend: str = "inductor",
    ) -> LatentDiffusionPipeline:
        """Opt-in ``torch.compile`` of the denoising network and (``decoder=True``) the
        autoencoder's decode, through :func:`ldmkit.accel.compile.compile_network`: the first
        call compiles (minutes on a CPU); with ``dynamic=True`` later batch sizes and
        resolutions reuse that graph. With ``freeze`` the weights must not change afterwards
        (and the compiled network's ``state_dict`` keys gain a ``net.`` prefix)."""
        from ldmkit.accel.compile import compile_network

        denoiser = self.model.denoiser
        denoiser.net = compile_network(
            denoiser.net, dynamic=dynamic, freeze=freeze, backend=backend
        )
        if decoder:
            self._decode = compile_network(
                self.autoencoder.decode, dynamic=dynamic, freeze=freeze, backend=backend
            )
        return self

    @property
    def config(self) -> DiffusionModelConfig:
        return self.model.config

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        class_labels: int | Sequence[int] | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        schedule: str | None = None,
        guidance: float | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int = 64,
        callback: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
        output: str = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """Sample images; ``output="tensor"`` returns [N, C, H, W] in [-1, 1] instead of PIL."""
        cfg = self.model.config
        prompts, labels = self._inputs(prompt, class_labels, num_images_per_prompt)
        n = len(prompts) if prompts is not None else len(labels)
        negatives = self._negatives(negative_prompt, n, num_images_per_prompt)
        f = self.autoencoder.downsampling_factor
        c, h, w = self.latent_size
        if height is not None or width is not None:
            height, width = height or h * f, width or w * f
            if height % f or width % f:
                raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
            h, w = height // f, width // f
        images = []
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            cond = self.model.condition(
                prompts[start:end] if prompts else None,
                labels[start:end] if labels is not None else None,
            )
            if cfg.conditioning == "text" and negatives is not None:
                uncond = self.model.condition(negatives[start:end])
            else:
                uncond = self.model.null_condition(end - start)
            generators = [torch.Generator().manual_seed(seed + k) for k in range(start, end)]
            z = self.model.sample(
                (end - start, c, h, w),
                cond,
                uncond,
                steps=steps,
                sampler=sampler,
                schedule=schedule,
                guidance=guidance,
                generator=generators,
                callback=callback,
                progress=progress,
            )
            x = self._decode(z.float())
            if not torch.isfinite(x).all():
                raise FloatingPointError("the decoded images contain NaN/inf")
            images.append(x.clamp(-1, 1))
        out = torch.cat(images)
        return out if output == "tensor" else [to_pil(img) for img in out]

    def _inputs(
        self, prompt: Any, class_labels: Any, per: int
    ) -> tuple[list[str] | None, torch.Tensor | None]:
        cfg = self.model.config
        if cfg.conditioning == "text":
            if prompt is None:
                raise ValueError(
                    "this model is text-conditional: pass a prompt or a list of prompts"
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            return [p for p in prompts for _ in range(per)], None
        if cfg.conditioning == "class":
            if class_labels is None:
                raise ValueError(
                    f"this model is class-conditional: pass class_labels (0..{cfg.num_classes - 1})"
                )
            labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
            return None, torch.tensor([lab for lab in labels for _ in range(per)])
        return None, torch.full((per,), -1)

    @staticmethod
    def _negatives(negative: Any, n: int, per: int) -> list[str] | None:
        if negative is None:
            return None
        if isinstance(negative, str):
            return [negative] * n
        negatives = [p for p in negative for _ in range(per)]
        if len(negatives) != n:
            raise ValueError(f"got {len(negative)} negative prompts for {n // per} prompts")
        return negatives


def load_pipeline(path: str | Path, **options: Any) -> Any:
    """A pipeline from an ldmkit diffusion run folder, or from a Stable Diffusion checkpoint.

    A run folder gives a :class:`LatentDiffusionPipeline`. A single checkpoint file, a diffusers
    folder (``model_index.json``) or an ldmkit SD export gives a
    :class:`ldmkit.interop.pipeline.StableDiffusionPipeline`; ``options`` go to
    :func:`ldmkit.interop.load.load_stable_diffusion` (``family``, ``prediction``, ``dtype``,
    ``vae_dtype``, ``allow_pickle``). Weights are never unpickled unless asked.
    """
    from ldmkit.interop.load import is_stable_diffusion_path, load_stable_diffusion

    path = Path(path)
    if is_stable_diffusion_path(path):
        return load_stable_diffusion(path, **options)
    if options:
        raise TypeError(f"options {sorted(options)} apply to Stable Diffusion checkpoints only")
    weights, meta = load_model_files(path)
    if meta.get("kind") != "diffusion":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} model, not a diffusion model")
    cfg = from_dict(DiffusionModelConfig, meta["config"])
    encoder = None
    if cfg.conditioning == "text":
        from ldmkit.conditioning.hf import load_text_encoder

        encoder = load_text_encoder(cfg.text_encoder)
    model = DiffusionModel(cfg, encoder)
    model.load_state_dict(weights)
    run = resolve_checkpoint(path).parent.parent
    autoencoder = load_autoencoder(run / "autoencoder")
    latent_size = tuple(int(v) for v in meta.get("latent_size", ()))
    if not latent_size:
        raise ValueError(f"{path}: model.json has no latent_size")
    return LatentDiffusionPipeline(model, autoencoder, latent_size)
