import pytest
import torch

from ldmkit.eval.classifier import (
    ClassifierConfig,
    SmallClassifier,
    frechet_distance,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2.0 + torch.tensor(
        [1.0, 0.0, 0.0]
    )
    # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2*2I) = 1 + 3 = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_classifier_learns_a_separable_toy_task(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(256, 1, 16, 16, generator=g) * 0.2 - 1.0
    labels = torch.arange(256) % 2
    images[labels == 1, :, :8] += 1.5  # class 1: bright top half
    data = [{"image": x, "label": y} for x, y in zip(images, labels, strict=True)]
    model = train_classifier(
        data,
        ClassifierConfig(width=8, feature_dim=16, num_classes=2),
        epochs=3,
        batch_size=32,
        progress=False,
    )
    pred, feats = predict(model, images)
    assert (pred == labels).float().mean() > 0.95 and feats.shape == (256, 16)
    save_classifier(model, tmp_path / "clf", {"accuracy": 1.0})
    again = load_classifier(tmp_path / "clf")
    torch.testing.assert_close(again(images[:4]), model(images[:4]))


def test_any_input_size():
    model = SmallClassifier(ClassifierConfig(width=8))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert model(torch.zeros(2, 1, 24, 40)).shape == (2, 10)
