"""End to end: tiny autoencoder -> tiny text-conditional LDM -> load_pipeline -> images."""

import pytest
import torch

import ldmkit
from ldmkit.autoencoders.train import train_autoencoder
from ldmkit.config import from_dict
from ldmkit.diffusion.task import DiffusionRecipe
from ldmkit.diffusion.train import train_diffusion

TINY_UNET = {
    "in_channels": 2,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_levels": [1],
    "num_heads": 2,
    "norm_groups": 8,
}


def _recipe(tmp_path, ae_run, **model):
    model_cfg = {
        "unet": dict(TINY_UNET, context_dim=16),
        "text_encoder": {"kind": "trained", "dim": 16, "depth": 1, "heads": 2, "max_length": 16},
        "steps": 4,
        **model,
    }
    return from_dict(
        DiffusionRecipe,
        {
            "run_dir": str(tmp_path / "ldm"),
            "autoencoder": str(ae_run),
            "model": model_cfg,
            "data": {"name": "shapes", "image_size": 16, "train_size": 16, "val_size": 4},
            "train": {"steps": 3, "batch_size": 4, "checkpoint_every": 3, "sample_every": 3},
            "preview_steps": 2,
        },
    )


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from conftest import tiny_recipe

    tmp = tmp_path_factory.mktemp("t2i")
    ae = tiny_recipe(tmp / "ae", train={"steps": 2}, loss={"disc_start": 100})
    train_autoencoder(ae, progress=False)
    metrics = train_diffusion(_recipe(tmp, tmp / "ae"), progress=False)
    return tmp, metrics


def test_train_and_load_pipeline(pipeline_run):
    tmp, metrics = pipeline_run
    assert metrics["step"] == 3 and metrics["val_loss"] > 0
    assert (tmp / "ldm" / "latents" / "train.safetensors").is_file()
    assert (tmp / "ldm" / "samples" / "step_00000003.png").is_file()
    pipe = ldmkit.load_pipeline(tmp / "ldm")
    images = pipe(
        ["a red circle in the center", "a blue square at the top left"], steps=3, progress=False
    )
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    big = pipe("a red circle in the center", steps=2, height=24, width=32, progress=False)
    assert big[0].size == (32, 24)


def test_pooled_text_feeds_the_vector_embedding(pipeline_run, tmp_path):
    tmp, _ = pipeline_run
    train_diffusion(_recipe(tmp_path, tmp / "ae", pooled_text=True), progress=False)
    pipe = ldmkit.load_pipeline(tmp_path / "ldm")
    assert pipe.config.pooled_text and pipe.config.unet.vector_dim == 16  # the encoder's dim
    model = pipe.model
    cond = model.condition(["a red circle in the center"])
    assert cond["vector"].shape == (1, 16)
    x, sigma = torch.randn(1, 2, 8, 8), torch.tensor([2.0])
    moved = dict(cond, vector=cond["vector"] + 1.0)
    assert not torch.allclose(model(x, sigma, cond), model(x, sigma, moved))
    bad = _recipe(tmp_path / "bad", tmp / "ae", pooled_text=True)
    bad.model.unet.vector_dim = 7
    with pytest.raises(ValueError, match="vector_dim is 7"):
        train_diffusion(bad, progress=False)


def test_seed_gives_the_same_image_whatever_the_batch(pipeline_run):
    tmp, _ = pipeline_run
    pipe = ldmkit.load_pipeline(tmp / "ldm")
    prompts = [
        "a red circle in the center",
        "a green triangle on the left",
        "a blue square at the top",
    ]
    for sampler in ("euler_ancestral", "dpmpp_2m"):
        batch = pipe(prompts, steps=3, sampler=sampler, seed=7, output="tensor", progress=False)
        alone = pipe(
            prompts[1:2], steps=3, sampler=sampler, seed=8, output="tensor", progress=False
        )
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)


def test_negative_prompt_and_bad_inputs(pipeline_run):
    tmp, _ = pipeline_run
    pipe = ldmkit.load_pipeline(tmp / "ldm")
    a = pipe("a red circle in the center", steps=2, guidance=3.0, output="tensor", progress=False)
    b = pipe(
        "a red circle in the center",
        steps=2,
        guidance=3.0,
        negative_prompt="a blue square at the top",
        output="tensor",
        progress=False,
    )
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a red circle", height=15, progress=False)
    with pytest.raises(ValueError, match="text-conditional"):
        pipe(None, progress=False)


def test_sample_and_eval_from_the_command_line(pipeline_run, capsys):
    import json

    from PIL import Image

    from ldmkit.cli import main

    tmp, _ = pipeline_run
    run = str(tmp / "ldm")
    grid = tmp / "grid.png"
    args = [
        "sample",
        run,
        "--prompt",
        "a red circle in the center",
        "--prompt",
        "a blue square at the top",
    ]
    assert main([*args, "--n", "2", "--steps", "2", "--out", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)
    folder = tmp / "imgs"
    assert main([*args, "--steps", "2", "--seed", "5", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["0000_seed5.png", "0001_seed6.png"]
    assert main(["eval", "diffusion", run, "--n", "2", "--steps", "2"]) == 0
    result = json.loads((tmp / "ldm" / "eval.json").read_text())
    assert result["1_object"]["n"] == 2 and 0.0 <= result["2_object"]["accuracy"] <= 1.0
    assert main(["sample", run, "--out", str(grid)]) == 2  # no prompt for a text model
    assert "text-conditional" in capsys.readouterr().err


def test_recipes_load_and_the_objective_follows_the_model():
    from pathlib import Path

    from ldmkit.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in [*sorted((root / "diffusion").glob("*.yaml")), root / "demo" / "t2i.yaml"]:
        recipe = load_config(DiffusionRecipe, path, ["data.path=/somewhere"])
        assert recipe.objective.parameterization == recipe.model.parameterization
    unet = root / "diffusion" / "t2i_shapes_unet.yaml"
    assert load_config(DiffusionRecipe, unet).objective.time_shift == 3.0  # flow-only option
    with pytest.raises((ConfigError, ValueError), match="follows the model"):
        load_config(
            DiffusionRecipe, unet, ["objective.parameterization=eps", "objective.time_shift=1.0"]
        )
    with pytest.raises((ConfigError, ValueError), match="time_shift"):
        load_config(DiffusionRecipe, unet, ["model.parameterization=eps", "model.schedule=karras"])


def test_run_exports_unet_and_vae_that_diffusers_loads(pipeline_run, tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    from ldmkit.interop.convert import convert

    tmp, _ = pipeline_run
    pipe = ldmkit.load_pipeline(tmp / "ldm")
    net, vae = pipe.model.denoiser.net, pipe.autoencoder
    with torch.no_grad():  # a trained run's zero-initialised layers are barely trained
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    folder = tmp_path / "diffusers"
    import ldmkit.pipelines.text2img as text2img

    monkeypatch.setattr(text2img, "load_pipeline", lambda run: pipe)  # the perturbed model
    convert(tmp / "ldm", folder, to="diffusers")
    single = convert(tmp / "ldm", tmp_path / "run.safetensors", to="single-file")
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([10.0, 700.0])
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    from_file = diffusers.UNet2DConditionModel.from_single_file(
        str(single), config=str(folder), subfolder="unet", local_files_only=True
    )
    with torch.no_grad():
        expected = net(x, t, ctx)
        assert (unet(x, t, encoder_hidden_states=ctx).sample - expected).abs().max() <= 1e-5
        assert (from_file(x, t, encoder_hidden_states=ctx).sample - expected).abs().max() <= 1e-5
        dvae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
        z = torch.randn(1, 2, 4, 4, generator=g)
        assert (dvae.decode(z).sample - vae.decode(z, scaled=False)).abs().max() <= 1e-5
    assert (folder / "scheduler" / "scheduler_config.json").is_file()


def test_pooled_text_vector_exports_as_a_projection_class_embedding():
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from ldmkit.denoisers.unet import UNet, UNetConfig
    from ldmkit.interop.export_run import _unet_for_diffusers

    torch.manual_seed(0)
    net = UNet(UNetConfig(**dict(TINY_UNET, context_dim=16, vector_dim=12)))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    fake = SimpleNamespace(
        model=SimpleNamespace(
            config=SimpleNamespace(network="unet"), denoiser=SimpleNamespace(net=net)
        ),
        latent_size=(2, 8, 8),
    )
    config, weights = _unet_for_diffusers(fake)
    ref = diffusers.UNet2DConditionModel(**config)
    ref.load_state_dict(weights, strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx, y = (
        torch.randn(2, 2, 8, 8, generator=g),
        torch.randn(2, 5, 16, generator=g),
        torch.randn(2, 12, generator=g),
    )
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        out = ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample
        assert (out - net(x, t, ctx, y)).abs().max() <= 1e-5


def test_compiled_pipeline_matches_eager_at_new_sizes_without_recompiling(pipeline_run):
    """``pipe.compile()`` with dynamo's guards and graphs (``aot_eager``: no code generation;
    the inductor backend itself is exercised in tests/test_compile.py)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    tmp, _ = pipeline_run
    pipe = ldmkit.load_pipeline(tmp / "ldm")
    calls = [dict(prompt="a red circle in the center", height=16, width=16),
             dict(prompt=["a blue square", "a red circle"], height=24, width=32)]  # fmt: skip
    eager = [pipe(**c, steps=2, output="tensor", progress=False) for c in calls]
    torch._dynamo.reset()
    counters.clear()
    pipe.compile(backend="aot_eager")
    for c, ref in zip(calls, eager, strict=True):
        out = pipe(**c, steps=2, output="tensor", progress=False)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2  # the denoising network and the decoder
    torch._dynamo.reset()
