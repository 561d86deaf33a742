import json
import subprocess
import sys

import yaml
from PIL import Image

from ldmkit.cli import main
from ldmkit.config import to_dict


def _write_recipe(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(to_dict(recipe)))
    return str(path)


def test_help_explains_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "ldmkit.cli", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "key=value" in out.stdout and "examples:" in out.stdout
    for cmd in (["eval", "--help"], ["reconstruct", "--help"], ["dataset", "preview", "--help"]):
        res = subprocess.run(
            [sys.executable, "-m", "ldmkit.cli", *cmd], capture_output=True, text=True
        )
        assert res.returncode == 0 and "examples:" in res.stdout, cmd


def test_train_eval_reconstruct_from_the_command_line(tmp_path, recipe, capsys):
    config = _write_recipe(tmp_path, recipe)
    run = str(tmp_path / "cli_run")
    assert (
        main(["train", "autoencoder", config, f"run_dir={run}", "train.steps=2", "--no-progress"])
        == 0
    )
    assert json.loads((tmp_path / "cli_run" / "metrics.json").read_text())["step"] == 2

    assert main(["eval", "autoencoder", run, "--n", "4"]) == 0
    metrics = json.loads((tmp_path / "cli_run" / "eval.json").read_text())
    assert metrics["n"] == 4 and metrics["psnr"] > 0

    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (20, 24), (200, 30, 30)).save(images / "a.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(images / "b.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "recon"
    assert main(["reconstruct", run, str(images), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"a.png", "b.png", "comparison.png", "psnr.json"}
    assert Image.open(out / "a.png").size == (16, 16)  # the run's image size
    assert main(["reconstruct", run, str(images / "a.png"), "--out", str(out), "--size", "0"]) == 0
    assert Image.open(out / "a.png").size == (20, 24)  # native size, a multiple of f=2


def test_dataset_preview(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["dataset", "preview", "shapes", "--out", str(out), "--n", "9", "--captions"]) == 0
    assert Image.open(out).size == (3 * 34 + 2, 3 * 34 + 2)
    text = capsys.readouterr().out
    assert "wrote" in text and any(p in text for p in (" at the ", " in the center", " on the "))


def test_bad_input_gives_a_clear_error_and_exit_code(tmp_path, recipe, capsys):
    config = _write_recipe(tmp_path, recipe)
    assert main(["train", "autoencoder", config, "train.stepz=3"]) == 2
    assert "train.stepz: unknown key" in capsys.readouterr().err
    assert (
        main(["train", "autoencoder", config, "data.name=folder", f"data.path={tmp_path}/none"])
        == 2
    )
    assert "none" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the data was checked
    assert main(["eval", "autoencoder", str(tmp_path / "missing")]) == 2
