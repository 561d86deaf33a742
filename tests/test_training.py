import json
import os
from pathlib import Path

import pytest
import torch

from ldmkit.autoencoders.task import AutoencoderTask, load_autoencoder
from ldmkit.autoencoders.train import train_autoencoder
from ldmkit.training import checkpoint as ckpt_mod
from ldmkit.training.checkpoint import latest_checkpoint, load_training_state
from ldmkit.training.loop import TrainingDiverged


def _state(run_dir):
    tensors, plain = load_training_state(latest_checkpoint(run_dir))
    return tensors, plain


def test_train_writes_a_complete_run(recipe):
    metrics = train_autoencoder(recipe, progress=False)
    run = recipe.run_dir
    assert os.path.isfile(f"{run}/config.yaml")
    assert sorted(os.listdir(f"{run}/checkpoints")) == ["latest", "step_00000004", "step_00000006"]
    assert os.path.isfile(f"{run}/samples/step_00000006.png")
    assert os.path.isfile(f"{run}/logs/scalars.jsonl")
    saved = json.loads(Path(f"{run}/metrics.json").read_text())
    assert saved["step"] == 6 and saved["val_psnr"] == metrics["val_psnr"] > 0
    # The latent scale was computed from data and stored in the model's config.
    model = load_autoencoder(run)
    assert model.config.scaling_factor == pytest.approx(saved["scaling_factor"])
    assert model.config.scaling_factor != 1.0
    x = torch.zeros(1, 3, 16, 16)
    assert model.encode(x).shape == (1, 2, 8, 8)
    # Running it again resumes the finished run: nothing changes, the scale is kept.
    again = train_autoencoder(recipe, progress=False)
    assert again["scaling_factor"] == saved["scaling_factor"] and again["step"] == 6


def test_resume_is_exact(tmp_path, make_recipe):
    straight = make_recipe(tmp_path / "a")
    train_autoencoder(straight, progress=False)
    paused = make_recipe(tmp_path / "b")
    train_autoencoder(paused, progress=False, stop_at=3)  # past disc_start=2: both optimizers live
    assert _state(paused.run_dir)[1]["step"] == 3
    train_autoencoder(paused, progress=False)
    a, b = _state(straight.run_dir)[0], _state(paused.run_dir)[0]
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("rng."):
            continue
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert torch.equal(a["rng.generator"], b["rng.generator"])


def test_killed_checkpoint_write_keeps_the_previous_one(recipe, monkeypatch):
    train_autoencoder(recipe, progress=False, stop_at=2)
    good = latest_checkpoint(recipe.run_dir)
    calls = {"n": 0}
    real = ckpt_mod.save_tensors

    def dying(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # die between the model file and the state file
            raise KeyboardInterrupt
        real(tensors, path, metadata)

    monkeypatch.setattr(ckpt_mod, "save_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(recipe, progress=False)
    assert latest_checkpoint(recipe.run_dir) == good  # still the complete one
    assert [p for p in os.listdir(f"{recipe.run_dir}/checkpoints") if p.startswith(".")] == []
    monkeypatch.setattr(ckpt_mod, "save_tensors", real)
    train_autoencoder(recipe, progress=False)  # resumes from the good checkpoint
    assert _state(recipe.run_dir)[1]["step"] == 6


def test_nan_stops_with_a_clear_message_and_keeps_the_last_checkpoint(recipe, monkeypatch):
    real = AutoencoderTask.training_step

    def poisoned(self, batch, step, generator):
        out = real(self, batch, step, generator)
        if step == 3:
            out["model"] = out["model"] * float("nan")
        return out

    monkeypatch.setattr(AutoencoderTask, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss 'model' became nan at step 3.*step_00000002"):
        train_autoencoder(recipe, progress=False)
    tensors, plain = _state(recipe.run_dir)
    assert plain["step"] == 2
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_vq_recipe_trains_and_reports_codebook_usage(tmp_path, make_recipe):
    recipe = make_recipe(tmp_path / "vq", model={"kind": "vq", "codebook_size": 8})
    metrics = train_autoencoder(recipe, progress=False)
    assert recipe.loss.kind == "vq"
    assert 0.0 <= metrics["codebook_dead_fraction"] <= 1.0
    assert metrics["codebook_perplexity"] >= 1.0
    assert 0.0 < metrics["val_code_usage"] <= 1.0 and metrics["val_code_perplexity"] >= 1.0


def test_bf16_and_accumulation_run(tmp_path, make_recipe):
    recipe = make_recipe(
        tmp_path / "bf16",
        train={
            "mixed_precision": "bf16",
            "grad_accum": 2,
            "gradient_checkpointing": True,
            "steps": 2,
        },
    )
    metrics = train_autoencoder(recipe, progress=False)
    assert metrics["step"] == 2 and metrics["val_psnr"] > 0


def test_restart_starts_afresh(recipe):
    train_autoencoder(recipe, progress=False)
    recipe.train.steps = 2
    train_autoencoder(recipe, progress=False, resume=False)
    assert sorted(os.listdir(f"{recipe.run_dir}/checkpoints")) == ["latest", "step_00000002"]
    assert _state(recipe.run_dir)[1]["step"] == 2
    steps = [
        json.loads(line)["step"]
        for line in Path(f"{recipe.run_dir}/logs/scalars.jsonl").read_text().splitlines()
    ]
    assert max(steps) == 2


def test_ema_warms_up_then_averages():
    from torch import nn

    from ldmkit.training.ema import EMA

    lin = nn.Linear(1, 1, bias=False)
    w0 = lin.weight.item()
    ema = EMA(lin, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.999
    with torch.no_grad():
        lin.weight.fill_(2.0)
    ema.update(ema.decay_at(0))  # shadow = 0.1 * w0 + 0.9 * 2.0
    assert ema.shadow["weight"].item() == pytest.approx(0.1 * w0 + 1.8, rel=1e-6)
    ema.update(0.5)
    expected = 0.5 * (0.1 * w0 + 1.8) + 1.0
    with ema.swapped_in() as module:
        assert module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert lin.weight.item() == 2.0  # restored after the context


def test_adam_is_fused_on_cpu_and_its_state_resumes_into_either_kernel():
    from ldmkit.training.checkpoint import optimizer_from_flat, optimizer_to_flat
    from ldmkit.training.config import TrainConfig
    from ldmkit.training.loop import make_optimizer

    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, generator=g)
    grads = [torch.randn(5, 3, generator=g) for _ in range(3)]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.01)

    def run(opt, p, steps):
        for grad in steps:
            p.grad = grad.clone()
            opt.step()

    fused_p = torch.nn.Parameter(start.clone())
    fused = make_optimizer(cfg, [fused_p])
    assert fused.param_groups[0]["fused"] is True
    loop_p = torch.nn.Parameter(start.clone())
    loop = torch.optim.AdamW([loop_p], lr=1e-2, weight_decay=0.01)  # PyTorch's CPU default
    run(fused, fused_p, grads[:2]), run(loop, loop_p, grads[:2])
    torch.testing.assert_close(fused_p.data, loop_p.data)  # the same update rule
    # A fused run's state resumes into the per-tensor loop (as on a device without the fused
    # kernel) and continues like the uninterrupted run; the kernel flag stays the live one.
    tensors, plain = optimizer_to_flat(fused, "opt")
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from the file
    assert plain["param_groups"][0]["fused"] is True
    resumed_p = torch.nn.Parameter(fused_p.data.clone())
    resumed = torch.optim.AdamW([resumed_p], lr=1e-2, weight_decay=0.01)
    optimizer_from_flat(resumed, tensors, plain, "opt")
    assert not resumed.param_groups[0]["fused"]
    run(resumed, resumed_p, grads[2:]), run(fused, fused_p, grads[2:])
    torch.testing.assert_close(resumed_p.data, fused_p.data)
