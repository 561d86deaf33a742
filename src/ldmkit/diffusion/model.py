"""A trained latent diffusion model: network + parameterization + conditioner, one config.

``DiffusionModel`` owns the denoiser (``denoise(x, sigma, cond) -> x0``), the text encoder
when it is trained jointly, and the defaults used for sampling. ``sample`` runs any
registered sampler with classifier-free guidance on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from ldmkit.denoisers.dit import DiT, DiTConfig
from ldmkit.denoisers.unet import UNet, UNetConfig
from ldmkit.diffusion import schedules
from ldmkit.diffusion.denoiser import Denoiser, build_denoiser
from ldmkit.samplers import get_sampler
from ldmkit.samplers.guidance import CFGDenoiser
from ldmkit.utils.random import Generators, randn

Cond = dict[str, torch.Tensor]


@dataclass
class DiffusionModelConfig:
    """Network, parameterization, conditioning and sampling defaults (the ``model:`` section)."""

    network: Literal["unet", "dit"] = "unet"
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    parameterization: Literal["eps", "v", "x0", "edm", "flow"] = "eps"
    # discrete VP schedule (eps / v / x0)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    sigma_data: float = 0.5  # EDM
    # conditioning
    conditioning: Literal["none", "class", "text"] = "text"
    num_classes: int | None = None
    class_names: list[str] | None = None
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"kind": "trained"})
    # Also feed the prompt's pooled embedding to the network as its vector ``y`` (added to the
    # time embedding, as SDXL does with pooled CLIP); the net's vector_dim is set to match.
    pooled_text: bool = False
    # sampling defaults
    sampler: str = "dpmpp_2m"
    schedule: Literal["karras", "exponential", "discrete", "flow"] = "karras"
    steps: int = 30
    guidance: float = 4.0
    flow_shift: float = 1.0

    def validate(self) -> None:
        if self.conditioning == "class" and not self.num_classes:
            raise ValueError("conditioning=class needs num_classes")
        if self.pooled_text and self.conditioning != "text":
            raise ValueError("pooled_text needs conditioning=text")
        if self.parameterization == "flow" and self.schedule not in ("flow", "karras"):
            raise ValueError("a flow model samples on schedule=flow (or karras)")
        if self.schedule == "discrete" and self.parameterization in ("edm", "flow"):
            raise ValueError(
                f"schedule=discrete needs a discrete VP model, not {self.parameterization}"
            )

    def net_config(self) -> UNetConfig | DiTConfig:
        return self.unet if self.network == "unet" else self.dit


def train_sigmas(cfg: DiffusionModelConfig) -> torch.Tensor:
    """Sigmas of the discrete VP training timesteps (increasing)."""
    if cfg.beta_schedule == "linear":
        betas = schedules.betas_linear(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    else:
        betas = schedules.betas_cosine(cfg.num_timesteps)
    if cfg.zero_terminal_snr:
        betas = schedules.rescale_zero_terminal_snr(betas)
    return schedules.vp_sigmas(schedules.alphas_cumprod(betas)).float()


def _wire_conditioning(
    cfg: DiffusionModelConfig, encoder: nn.Module | None
) -> DiffusionModelConfig:
    """``cfg`` with the network's label embedding matching the conditioning.

    Class conditioning sets the net's ``num_classes``; ``pooled_text`` sets its ``vector_dim``
    to the text encoder's pooled size. A net value that disagrees is an error.
    """
    net = cfg.net_config()
    if cfg.conditioning == "class":
        field_name, value = "num_classes", cfg.num_classes
    elif cfg.pooled_text:
        if encoder is None:
            raise ValueError("pooled_text needs a text encoder")
        field_name, value = "vector_dim", encoder.pooled_dim
    else:
        return cfg
    current = getattr(net, field_name)
    if current not in (None, value):
        raise ValueError(
            f"{cfg.network}.{field_name} is {current} but the conditioning needs {value}"
        )
    return replace(cfg, **{cfg.network: replace(net, **{field_name: value})})


class DiffusionModel(nn.Module):
    """Denoiser plus (optionally) a jointly trained text encoder."""

    def __init__(self, config: DiffusionModelConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        config.validate()
        config = _wire_conditioning(config, text_encoder)
        self.config = config
        net_cfg = config.net_config()
        net: nn.Module = UNet(net_cfg) if config.network == "unet" else DiT(net_cfg)
        kind = config.parameterization
        kwargs: dict[str, Any] = {}
        if kind in ("eps", "v", "x0"):
            kwargs["train_sigmas"] = train_sigmas(config)
        elif kind == "edm":
            kwargs["sigma_data"] = config.sigma_data
        self.denoiser: Denoiser = build_denoiser(kind, net, **kwargs)
        # A trainable encoder is a submodule (trained, EMA'd, saved); a frozen one is kept out
        # of the state dict (it has its own files) by storing it in a tuple.
        trainable = text_encoder is not None and getattr(text_encoder, "trainable", False)
        self.text_encoder = text_encoder if trainable else None
        self._frozen_text = (None if trainable else text_encoder,)

    @property
    def encoder(self) -> nn.Module | None:
        return self.text_encoder if self.text_encoder is not None else self._frozen_text[0]

    # -- conditioning -----------------------------------------------------------------------
    def condition(
        self, texts: Sequence[str] | None = None, labels: torch.Tensor | None = None
    ) -> Cond:
        """The cond dict for a batch of prompts or class labels (``""`` / null class = uncond)."""
        cfg = self.config
        if cfg.conditioning == "text":
            if texts is None:
                raise ValueError("this model is text-conditional: give prompts")
            emb = self.encoder.encode(list(texts))
            cond = {"crossattn": emb.tokens, "crossattn_mask": emb.mask}
            if cfg.pooled_text:
                cond["vector"] = emb.pooled
            return cond
        if cfg.conditioning == "class":
            if labels is None:
                raise ValueError("this model is class-conditional: give class labels")
            labels = torch.as_tensor(labels, dtype=torch.long)
            if ((labels < 0) | (labels > cfg.num_classes)).any():
                raise ValueError(f"class labels must be in 0..{cfg.num_classes - 1}")
            return {"class": labels}
        return {}

    def null_condition(self, batch: int) -> Cond:
        """The unconditional cond (empty prompt / null class) for classifier-free guidance."""
        if self.config.conditioning == "text":
            return self.condition([""] * batch)
        if self.config.conditioning == "class":
            return {"class": torch.full((batch,), self.config.num_classes, dtype=torch.long)}
        return {}

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None
    ) -> torch.Tensor:
        return self.denoiser(x, sigma, cond)

    # -- sampling ---------------------------------------------------------------------------
    def sigmas(self, steps: int, schedule: str | None = None) -> torch.Tensor:
        """The sigma grid (ending at 0) for ``steps`` steps."""
        cfg = self.config
        schedule = schedule or cfg.schedule
        if schedule == "discrete":
            return schedules.discrete_sigmas(self.denoiser.sigmas.cpu(), steps, "trailing")
        if schedule == "flow":
            return schedules.flow_sigmas(steps, shift=cfg.flow_shift)
        return schedules.get_sigmas(
            schedule, steps, sigma_min=self.denoiser.sigma_min, sigma_max=self.denoiser.sigma_max
        )

    @torch.no_grad()
    def sample(
        self,
        shape: Sequence[int],
        cond: Cond,
        uncond: Cond | None = None,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        schedule: str | None = None,
        guidance: float | None = None,
        generator: Generators = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """Latents [B, *shape[1:]] from noise: sampler + sigma grid + CFG on this model."""
        cfg = self.config
        steps = steps or cfg.steps
        scale = cfg.guidance if guidance is None else guidance
        sigmas = self.sigmas(steps, schedule)
        fn = get_sampler(sampler or cfg.sampler)
        param = next(self.parameters())
        x = randn(shape, generator, dtype=param.dtype, device=param.device) * sigmas[0]
        if uncond is None or cfg.conditioning == "none" or scale == 1.0:
            denoise = lambda x, s: self.denoiser(x, s, cond)  # noqa: E731
        else:
            denoise = CFGDenoiser(self.denoiser, cond, uncond, scale, **options.pop("cfg", {}))
        return fn(
            denoise,
            x,
            sigmas.to(param.device),
            generator=generator,
            callback=callback,
            disable=not progress,
            **options,
        )
