"""Class-conditional LDM on Fashion-MNIST, judged by a classifier: the whole command path."""

import json

import pytest
import torch

import ldmkit
from ldmkit.cli import main
from ldmkit.data.mnist import DatasetNotInstalled, FashionMNIST


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    try:
        FashionMNIST("test")
    except DatasetNotInstalled as exc:
        pytest.skip(str(exc))
    from conftest import tiny_recipe
    from ldmkit.autoencoders.train import train_autoencoder

    tmp = tmp_path_factory.mktemp("cls")
    fmnist = {"name": "fashion_mnist", "image_size": 32, "channels": 1, "train_size": 64}
    ae = tiny_recipe(
        tmp / "ae",
        model={"in_channels": 1, "out_channels": 1},
        data={**fmnist, "val_size": 8},
        train={"steps": 2},
        loss={"disc_start": 100},
    )
    train_autoencoder(ae, progress=False)
    unet = "{in_channels: 2, model_channels: 16, channel_mult: [1, 2], num_res_blocks: 1, attention_levels: [1], num_heads: 2, norm_groups: 8}"
    args = [
        "train",
        "diffusion",
        "configs/diffusion/class_fashion_mnist_unet.yaml",
        f"run_dir={tmp / 'ldm'}",
        f"autoencoder={tmp / 'ae'}",
        f"model.unet={unet}",
        "model.steps=2",
        "data.image_size=32",
        "data.train_size=64",
        "data.val_size=8",
        "train.steps=2",
        "train.batch_size=4",
        "train.eval_every=2",
        "train.sample_every=2",
        "--no-progress",
    ]
    assert main(args) == 0
    judge = [
        "train",
        "classifier",
        "configs/classifier/fashion_mnist.yaml",
        f"run_dir={tmp / 'judge'}",
        "data.image_size=32",
        "data.train_size=512",
        "data.val_size=256",
        "model.width=8",
        "epochs=2",
        "batch_size=32",
        "--no-progress",
    ]
    assert main(judge) == 0
    return tmp


def test_classifier_is_trained_and_tested(runs):
    meta = json.loads((runs / "judge" / "model.json").read_text())
    assert meta["metrics"]["test_images"] == 256
    # 32 steps of a tiny CNN already beat chance (10%) by far on Fashion-MNIST
    assert meta["metrics"]["test_accuracy"] > 0.2


def test_class_conditional_eval(runs, capsys):
    pipe = ldmkit.load_pipeline(runs / "ldm")
    assert pipe.config.conditioning == "class" and pipe.config.num_classes == 10
    one = pipe(class_labels=[3, 7], steps=2, seed=5, output="tensor", progress=False)
    assert one.shape == (2, 1, 32, 32)

    args = ["eval", "diffusion", str(runs / "ldm"), "--n", "4", "--steps", "2"]
    assert main(args) == 2  # a clear error: which flag is missing
    assert "--classifier" in capsys.readouterr().err
    assert main([*args, "--classifier", str(runs / "judge")]) == 0
    result = json.loads((runs / "ldm" / "eval.json").read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["n_samples"] == 40 and len(result["recognition_per_class"]) == 10
    assert 0.0 <= result["recognition"] <= 1.0
    # real training images are far closer to the test set than an untrained model's samples
    assert 0 < result["fd_train_vs_test"] < result["fd"]
    assert result["n_test"] == FashionMNIST("test").__len__()


def test_train_size_subsets_labelled_sets():
    from ldmkit.data.build import DataConfig, build_dataset

    try:
        full = build_dataset(DataConfig(name="fashion_mnist", channels=1), "train")
    except DatasetNotInstalled as exc:
        pytest.skip(str(exc))
    cfg = DataConfig(name="fashion_mnist", channels=1, train_size=100)
    a, b = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    assert len(a) == 100 and len(full) == 60000
    assert torch.equal(a[17]["image"], b[17]["image"])  # a fixed subset
