"""Stable Diffusion 1.x / 2.x / XL text-to-image with ldmkit's networks, samplers and guidance.

The pipeline holds ldmkit's own ``UNet`` and ``AutoencoderKL`` (weights mapped one-to-one) and
Hugging Face CLIP text encoders, and runs any ldmkit sampler through the denoiser contract:
``GridTimestepDenoiser`` (eps or v parameterization on the checkpoint's discrete schedule) ->
``CFGDenoiser`` (one batched call for both branches) -> ``SAMPLERS[name]``. With
``schedule="diffusers"`` (default) the sigma grid, the UNet timesteps and the initial noise
scale are those diffusers' scheduler for the same sampler would use, so the same seed, sampler,
steps and guidance give the same latents as diffusers' pipelines (see ``schedulers.py``).

Prompt encoding follows diffusers' ``encode_prompt``: SD 1.x/2.x use the (already
penultimate-trimmed, for 2.x) text encoder's last hidden state after the final layer norm;
SDXL concatenates both encoders' penultimate hidden states (no final norm), takes the second
encoder's projected EOS state as pooled text, and appends the micro-conditioning (original
size, crop top-left, target size), each embedded sinusoidally in 256 channels (Podell et al.
2023, Sec. 2.2), to form the UNet's vector input ``y``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from ldmkit.accel.fastpaths import prepare_for_inference
from ldmkit.accel.prepack import prepack
from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.data.transforms import to_pil
from ldmkit.denoisers.unet import UNet
from ldmkit.diffusion.schedules import get_sigmas
from ldmkit.interop.schedulers import (
    GridTimestepDenoiser,
    SchedulerConfig,
    diffusers_grid,
    train_sigmas,
)
from ldmkit.nn.embeddings import timestep_embedding
from ldmkit.samplers import CFGDenoiser, get_sampler
from ldmkit.utils.random import randn

SIZE_EMBED_DIM = 256  # SDXL's addition_time_embed_dim


class _CastNet(nn.Module):
    """Runs the UNet in its own dtype (bf16/fp16) and returns float32 to the denoiser."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in kw.items()}  # fmt: skip
        return self.unet(x.to(dtype), t, **kw).float()


class StableDiffusionPipeline:
    """``pipe(prompt, steps=30, sampler="dpmpp_2m", guidance=7.5, seed=0) -> [PIL images]``.

    Parts are reachable as ``pipe.unet`` (ldmkit ``UNet``, called ``unet(x, t, context, y)``),
    ``pipe.vae`` (ldmkit ``AutoencoderKL``), ``pipe.text_encoder`` / ``pipe.text_encoder_2``
    (transformers CLIP models), ``pipe.tokenizer`` / ``pipe.tokenizer_2`` and
    ``pipe.scheduler`` (:class:`SchedulerConfig`). ``family`` is the detected
    :class:`ldmkit.interop.detect.Family`.
    """

    def __init__(
        self,
        *,
        unet: UNet,
        vae: AutoencoderKL,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence[Any],
        encoder_specs: Sequence[Any],
        family: Any,
        scheduler: SchedulerConfig,
        force_zeros_for_empty_prompt: bool | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        source: str = "",
    ):
        if len(text_encoders) != len(tokenizers) or len(text_encoders) != len(encoder_specs):
            raise ValueError("need one tokenizer and one spec per text encoder")
        # weights packed for oneDNN at the first CPU call (ldmkit.accel.prepack; exact)
        self.unet, self.vae = prepack(unet.eval()), prepack(vae.eval())
        self._unet_call: nn.Module = self.unet  # or compiled (.compile())
        self._decode: Callable[[torch.Tensor], torch.Tensor] = self.vae.decode  # or compiled
        self.text_encoders = [te.eval() for te in text_encoders]
        self.tokenizers, self.encoder_specs = list(tokenizers), list(encoder_specs)
        self.force_zeros_for_empty_prompt = (
            family.size_conditioning
            if force_zeros_for_empty_prompt is None
            else force_zeros_for_empty_prompt
        )
        self.extras = extras or {}  # tensors of the source file with no place in these parts
        self.source = source
        self.notes: list[str] = []  # what detection guessed (e.g. an SD 2.x prediction type)
        self.set_scheduler(scheduler, family)

    def set_scheduler(self, scheduler: SchedulerConfig, family: Any | None = None) -> None:
        """Use another noise schedule / prediction type (e.g. a user's eps override)."""
        self.scheduler, self.family = scheduler, family or self.family
        self.denoiser = GridTimestepDenoiser(
            _CastNet(self._unet_call), train_sigmas(scheduler), prediction=scheduler.prediction
        )

    # -- parts ------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> nn.Module:
        return self.text_encoders[0]

    @property
    def text_encoder_2(self) -> nn.Module | None:
        return self.text_encoders[1] if len(self.text_encoders) > 1 else None

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers[0]

    @property
    def tokenizer_2(self) -> Any:
        return self.tokenizers[1] if len(self.tokenizers) > 1 else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(
        self, dtype: torch.dtype | None, *, vae_dtype: torch.dtype | None = torch.float32
    ) -> StableDiffusionPipeline:
        """Cast the UNet and text encoders to ``dtype``; the VAE stays in ``vae_dtype`` (fp32:
        the SD VAE overflows in fp16 and gives black images). ``None`` leaves a part as it is."""
        if dtype is not None:
            prepare_for_inference(self.unet, dtype)  # channels-last for bf16/fp16, packed weights
            for te in self.text_encoders:
                te.to(dtype)
        if vae_dtype is not None:
            prepare_for_inference(self.vae, vae_dtype)
        return self

    def compile(
        self,
        *,
        dynamic: bool = True,
        freeze: bool = True,
        decoder: bool = True,
        backend: str = "inductor",
    ) -> StableDiffusionPipeline:
        """Opt-in ``torch.compile`` of the UNet and (``decoder=True``) the VAE decode, through
        :func:`ldmkit.accel.compile.compile_network`: the first call compiles (minutes on a
        CPU); with ``dynamic=True`` later batch sizes and resolutions reuse that graph.
        ``freeze`` lets inductor pre-pack the weights as constants; they must not change
        afterwards. On a CPU compiling does not pay: the eager default already pre-packs
        (``ldmkit.accel.prepack``), and a dynamic-shape graph runs slower than it. SD 1.5 UNet,
        256 px, 2 threads: fp32 dynamic, 0.81x diffusers after a 447 s compile, against 1.32x
        eager; bf16 static (``dynamic=False``, one compile per shape), 0.98x the eager step."""
        from ldmkit.accel.compile import compile_network

        self._unet_call = compile_network(
            self.unet, dynamic=dynamic, freeze=freeze, backend=backend
        )
        self.denoiser.net.unet = self._unet_call
        if decoder:
            self._decode = compile_network(
                self.vae.decode, dynamic=dynamic, freeze=freeze, backend=backend
            )
        return self

    # -- conditioning -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token states [B, 77, context_dim], pooled text [B, P] or None) as diffusers does."""
        from ldmkit.interop.clip import encode_prompt_hidden

        states, pooled = [], None
        for te, tok, spec in zip(
            self.text_encoders, self.tokenizers, self.encoder_specs, strict=True
        ):
            ids = tok(
                list(prompts),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            hidden, proj = encode_prompt_hidden(te, ids, spec.layer, spec.final_norm)
            states.append(hidden.float())
            if spec.with_projection:
                pooled = proj.float()
        return torch.cat(states, dim=-1), pooled

    def _size_vector(
        self, pooled: torch.Tensor, sizes: tuple[int, int, int, int, int, int]
    ) -> torch.Tensor:
        """SDXL's ``y``: pooled text, then the six size/crop values embedded in 256 channels."""
        ids = torch.tensor(sizes, dtype=torch.float32)
        emb = timestep_embedding(ids, SIZE_EMBED_DIM).reshape(1, -1)
        return torch.cat([pooled, emb.expand(pooled.shape[0], -1)], dim=1)

    def _conditions(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        sizes: tuple[int, int, int, int, int, int],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        context, pooled = self.encode_prompt(prompts)
        zero_uncond = negatives is None and self.force_zeros_for_empty_prompt
        if zero_uncond:  # SDXL: "force_zeros_for_empty_prompt"
            u_context = torch.zeros_like(context)
            u_pooled = None if pooled is None else torch.zeros_like(pooled)
        else:
            u_context, u_pooled = self.encode_prompt(negatives or [""] * len(prompts))
        cond, uncond = {"crossattn": context}, {"crossattn": u_context}
        if self.unet.config.vector_dim is not None:
            if pooled is None:
                raise ValueError("this UNet needs pooled text, but no text encoder projects it")
            cond["vector"] = self._size_vector(pooled, sizes)
            uncond["vector"] = self._size_vector(u_pooled, sizes)
        return cond, uncond

    def _empty_inpainting_condition(self, n: int, height: int, width: int) -> torch.Tensor:
        """Inpainting UNets' extra channels for plain text-to-image: the mask covers the whole
        image (1 = repaint) and the masked image is all zeros (mid-grey), as diffusers' inpainting
        pipeline sets them for a white mask; its latent is the posterior mean."""
        extra = self.unet.config.concat_channels - 1
        if extra != self.vae.config.latent_channels:
            raise ValueError(f"cannot build {extra + 1} concat channels from this VAE")
        f = self.vae.downsampling_factor
        grey = torch.zeros(1, 3, height, width, dtype=next(self.vae.parameters()).dtype)
        masked = self.vae.encode(grey).float()
        mask = torch.ones(1, 1, height // f, width // f)
        return torch.cat([mask, masked], dim=1).expand(n, -1, -1, -1)

    # -- sampling ---------------------------------------------------------------------------
    def sigmas(self, sampler: str, steps: int, schedule: str) -> tuple[torch.Tensor, float, Any]:
        """(grid, initial noise scale, diffusers Grid or None) for ``schedule``."""
        if schedule == "diffusers":
            grid = diffusers_grid(self.scheduler, sampler, steps)
            return grid.sigmas, grid.init_noise_scale, grid
        d = self.denoiser
        sigmas = get_sigmas(schedule, steps, sigma_min=d.sigma_min, sigma_max=d.sigma_max)
        return sigmas, float(sigmas[0]), None

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        steps: int = 30,
        sampler: str = "dpmpp_2m",
        schedule: str = "diffusers",
        guidance: float = 7.5,
        guidance_rescale: float = 0.0,
        negative_prompt: str | Sequence[str] | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
        output: str = "pil",
        vae_tile: int | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Sample; ``output`` is "pil", "tensor" ([N, 3, H, W] in [-1, 1]) or "latent".

        ``vae_tile`` (latent pixels, e.g. 64) decodes in overlapping tiles to bound memory at
        large sizes (:func:`ldmkit.accel.tiling.tiled_decode`; close to, not equal to, the
        full decode).

        Image ``k`` uses its own CPU generator seeded ``seed + k``: image 0 starts from exactly
        the noise diffusers draws with ``torch.Generator().manual_seed(seed)``, and no image
        depends on the batch size.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("pass at least one prompt")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = None
        if negative_prompt is not None:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) == 1:
                negs = negs * (len(prompts) // num_images_per_prompt)
            if len(negs) * num_images_per_prompt != len(prompts):
                raise ValueError(f"got {len(negs)} negative prompts for {len(prompts)} prompts")
            negatives = [n for n in negs for _ in range(num_images_per_prompt)]
        if output not in ("pil", "tensor", "latent"):
            raise ValueError(f"output must be 'pil', 'tensor' or 'latent', got {output!r}")
        f = self.vae.downsampling_factor
        height = height or self.family.image_size
        width = width or self.family.image_size
        if height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of {f}, got "
                             f"{height}x{width}")  # fmt: skip
        sizes = (*(original_size or (height, width)), *crops_coords_top_left,
                 *(target_size or (height, width)))  # fmt: skip
        cond, uncond = self._conditions(prompts, negatives, sizes)

        if self.unet.config.concat_channels:
            concat = self._empty_inpainting_condition(len(prompts), height, width)
            cond, uncond = {**cond, "concat": concat}, {**uncond, "concat": concat}
        sigmas, init_scale, grid = self.sigmas(sampler, steps, schedule)
        self.denoiser.use_grid(grid)
        space = "v" if self.scheduler.prediction == "v" else "eps"
        denoise = CFGDenoiser(self.denoiser, cond, uncond, guidance,
                              rescale=guidance_rescale, rescale_space=space)  # fmt: skip
        generators = [torch.Generator().manual_seed(seed + k) for k in range(len(prompts))]
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        x = randn(shape, generators) * init_scale
        x = get_sampler(sampler)(denoise, x, sigmas, generator=generators, callback=callback,
                                 disable=not progress)  # fmt: skip
        self.denoiser.use_grid(None)
        latents = x / (1.0 + float(sigmas[-1]) ** 2) ** 0.5  # the VP latent at the last sigma
        if output == "latent":
            return latents
        vae_dtype = next(self.vae.parameters()).dtype
        if vae_tile:
            from ldmkit.accel.tiling import tiled_decode

            images = tiled_decode(self.vae, latents.to(vae_dtype), tile=vae_tile,
                                  overlap=max(1, vae_tile // 4)).float()  # fmt: skip
        else:
            images = self._decode(latents.to(vae_dtype)).float()
        if not torch.isfinite(images).all():
            raise FloatingPointError(
                "the decoded images contain NaN/inf; keep the VAE in float32 (the default)"
            )
        images = images.clamp(-1, 1)
        return images if output == "tensor" else [to_pil(img) for img in images]
