"""The shared training loop: digits reaches >= 95% in seconds; seeded runs are identical."""
from __future__ import annotations

import time

import pytest
import torch

from onp_fast import models
from onp_fast.data import load_dataset
from onp_fast.seed import seed_everything
from onp_fast.train import accuracy, predict, random_crop_flip, train_classifier


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_clean_training_reaches_95_percent():
    d = load_dataset("digits")
    seed_everything(0)
    model = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16)
    start = time.perf_counter()
    train_classifier(model, d.train_x, d.train_y, epochs=4, mean=d.mean, std=d.std, lr=0.1, progress=False)
    seconds = time.perf_counter() - start
    acc = accuracy(model, d.test_x, d.test_y, d.mean, d.std)
    print(f"digits preactresnet18 w0.125: test accuracy {100 * acc:.2f}% after {seconds:.1f}s of training")
    assert acc >= 0.95
    assert not model.training


def test_same_seed_same_weights_and_transform_hook():
    d = load_dataset("digits")
    x, y = d.train_x[:96], d.train_y[:96]
    calls = []

    def hook(xb, yb, g):
        calls.append(xb.shape[0])
        return random_crop_flip(pad=1)(xb, yb, g)

    def run(seed):
        torch.manual_seed(0)
        m = models.build("resnet18", in_channels=1, width=0.0625, input_size=16)
        train_classifier(m, x, y, epochs=1, mean=d.mean, std=d.std, batch_size=32, seed=seed, progress=False,
                         transform=hook)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert calls == [32, 32, 32] * 3
    logits = predict(models.build("resnet18", in_channels=1, width=0.0625, input_size=16), x[:5], d.mean, d.std)
    assert logits.shape == (5, 10)


def test_crop_flip_keeps_shape_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    out, _ = random_crop_flip(pad=0, flip=False)(x, torch.zeros(4), g)
    assert torch.equal(out, x)
    out, _ = random_crop_flip(pad=2, flip=True)(x, torch.zeros(4), g)
    assert out.shape == x.shape
