"""The generated data set: deterministic, configurable, and learnable by a small CNN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from boatray.config import SyntheticConfig
from boatray.data import synthetic
from boatray.data.images import decode_batch, normalize, to_chw
from boatray.errors import BoatrayError


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_layout_sizes_and_imbalance(tmp_path):
    cfg = SyntheticConfig(classes=5, train_per_class=30, test_per_class=6, image_size=(16, 48),
                          imbalance=3.0)
    root = synthetic.generate(tmp_path / "s", cfg, seed=0)
    train = {c: len(list((root / "train" / c).glob("*.jpg"))) for c in synthetic.class_names(5)}
    assert list(train.values()) == [30, 23, 17, 13, 10]
    assert len(list((root / "test").glob("*/*.jpg"))) == sum(
        synthetic.class_sizes(6, 5, 3.0, 1))
    with Image.open(next((root / "test").rglob("*.jpg"))) as image:
        assert image.size == (48, 16) and image.format == "JPEG"


def test_deterministic_for_a_seed_and_regenerated_in_place(tmp_path):
    cfg = SyntheticConfig(classes=2, train_per_class=3, test_per_class=1, image_size=(8, 24))
    first = files(synthetic.generate(tmp_path / "a", cfg, seed=7))
    assert files(synthetic.generate(tmp_path / "b", cfg, seed=7)) == first
    assert files(synthetic.generate(tmp_path / "a", cfg, seed=8)) != first  # replaced in place
    assert len(files(tmp_path / "a")) == len(first)


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine" / "train").mkdir(parents=True)
    with pytest.raises(BoatrayError, match="did not generate"):
        synthetic.generate(tmp_path / "mine", SyntheticConfig(), seed=0)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest and does not fight the other tests for the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_small_cnn_learns_it_in_a_few_epochs(tmp_path, one_thread):
    cfg = SyntheticConfig(classes=4, train_per_class=24, test_per_class=10, image_size=(16, 48),
                          imbalance=1.5)
    root = synthetic.generate(tmp_path / "s", cfg, seed=1)

    def load(split):
        paths = sorted((root / split).glob("*/*.jpg"))
        labels = [synthetic.class_names(4).index(p.parent.name) for p in paths]
        return normalize(to_chw(decode_batch([str(p) for p in paths], (16, 48)))), \
            torch.tensor(labels)

    (x_train, y_train), (x_test, y_test) = load("train"), load("test")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(4):
        for batch in torch.randperm(len(y_train)).split(8):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.9  # chance is 0.25
