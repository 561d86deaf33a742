"""Export an ldmkit-trained latent diffusion run for diffusers: its UNet, VAE and scheduler.

diffusers has no class for ldmkit's own text encoders (the word-level transformer trained with
the model, MiniLM), so a run exports as the parts diffusers can load on their own:
``unet/`` (``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``), ``scheduler/`` (the
training schedule: ``DDIMScheduler`` for eps/v/x0 models, ``FlowMatchEulerDiscreteScheduler``
for rectified flow) and ``ldmkit_run.json`` saying how the text was encoded. The single-file
form holds the UNet under ``model.diffusion_model.`` and the VAE under ``first_stage_model.``,
which diffusers' ``from_single_file`` reads given the exported folder as ``config``.

A pooled-text vector (``pooled_text: true``) becomes diffusers' ``class_embed_type=
"projection"`` (a Linear-SiLU-Linear added to the time embedding, as ldmkit's ``label_emb``).
What diffusers cannot express (DiT, VQ autoencoders, ``attention_position_embedding``, UNets
without cross-attention) is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldmkit.autoencoders.kl import AutoencoderKL
from ldmkit.config import to_dict
from ldmkit.interop.detect import UNET_PREFIX, VAE_PREFIX
from ldmkit.interop.diffusers_format import (
    unet_config_to_diffusers,
    unet_keys_to_diffusers,
    vae_config_to_diffusers,
    vae_keys_to_diffusers,
)
from ldmkit.interop.files import write_safetensors
from ldmkit.utils.io import atomic_write_dir, atomic_write_json


def _unet_for_diffusers(pipe: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diffusers UNet config, diffusers-keyed weights) of a run's UNet."""
    cfg = pipe.model.config
    if cfg.network != "unet":
        raise ValueError(f"only UNet runs export to diffusers; this run's network is {cfg.network}")
    net = pipe.model.denoiser.net
    size = pipe.latent_size[-1]
    config = unet_config_to_diffusers(net.config, sample_size=size)
    weights = unet_keys_to_diffusers(net.state_dict())
    if net.config.vector_dim is not None:  # pooled text: a projection "class" embedding
        for k in ("addition_embed_type", "addition_time_embed_dim"):
            config[k] = None
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = net.config.vector_dim
        weights = {
            k.replace("add_embedding.", "class_embedding.", 1): v for k, v in weights.items()
        }
    return config, weights


def _scheduler(cfg: Any) -> dict[str, Any] | None:
    if cfg.parameterization in ("eps", "v", "x0"):
        return {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": cfg.num_timesteps,
            "beta_start": cfg.beta_start,
            "beta_end": cfg.beta_end,
            # ldmkit's "linear" is linear in sqrt(beta) (LDM), diffusers' "scaled_linear"
            "beta_schedule": "scaled_linear"
            if cfg.beta_schedule == "linear"
            else "squaredcos_cap_v2",
            "prediction_type": {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[
                cfg.parameterization
            ],
            "rescale_betas_zero_snr": cfg.zero_terminal_snr,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "timestep_spacing": "trailing",
        }
    if cfg.parameterization == "flow":  # ldmkit feeds the UNet t * 1000, as SD3 does
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": cfg.flow_shift,
        }
    return None  # EDM: no diffusers scheduler with ldmkit's c_noise = ln(sigma) / 4 on a UNet


def export_run(run: str | Path, out: str | Path, to: str) -> Path:
    """Write the run's UNet + VAE (+ scheduler) as a diffusers folder or one single file."""
    from ldmkit.pipelines.text2img import load_pipeline

    pipe = load_pipeline(run)
    if not isinstance(pipe.autoencoder, AutoencoderKL):
        raise ValueError("only KL autoencoders export to diffusers (a VQ model has no class there)")
    unet_config, unet_weights = _unet_for_diffusers(pipe)
    vae = pipe.autoencoder
    vae_config = vae_config_to_diffusers(
        vae.config, sample_size=pipe.latent_size[-1] * vae.downsampling_factor
    )
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new path (nothing was written)")
    if to == "single-file":
        state = {UNET_PREFIX + k: v for k, v in pipe.model.denoiser.net.state_dict().items()}
        state.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
        write_safetensors(state, out, metadata={"format": "pt"})
        return out
    if to != "diffusers":
        raise ValueError(f"an ldmkit run exports to 'diffusers' or 'single-file', not {to!r}")

    def write(tmp: Path) -> None:
        atomic_write_json(
            tmp / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **unet_config}
        )
        write_safetensors(
            unet_weights, tmp / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"}
        )
        atomic_write_json(
            tmp / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae_config}
        )
        write_safetensors(
            vae_keys_to_diffusers(vae.state_dict()),
            tmp / "vae" / "diffusion_pytorch_model.safetensors",
            {"format": "pt"},
        )
        sched = _scheduler(pipe.model.config)
        if sched is not None:
            atomic_write_json(tmp / "scheduler" / "scheduler_config.json", sched)
        cfg = pipe.model.config
        atomic_write_json(
            tmp / "ldmkit_run.json",
            {
                "source": str(run),
                "parameterization": cfg.parameterization,
                "conditioning": cfg.conditioning,
                "text_encoder": cfg.text_encoder,
                "pooled_text_as": "class_labels" if cfg.pooled_text else None,
                "model": to_dict(cfg),
                "note": "diffusers has no class for this text encoder; load unet/, vae/ and "
                "scheduler/ on their own, and encode prompts with ldmkit",
            },
        )

    return atomic_write_dir(out, write)
