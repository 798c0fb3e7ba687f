import pytest
import torch

from fedleak.data import DATASETS


def test_synthetic_images_shapes_range_and_balance():
    source = DATASETS.build({"name": "synthetic_images", "channels": 3, "size": 12, "classes": 5})
    data = source.load()
    assert data.task.input_shape == (3, 12, 12) and data.task.num_classes == 5
    assert data.train.inputs.shape == (256, 3, 12, 12) and data.test.inputs.shape[0] == 64
    raw = data.train.inputs * 0.25 + 0.5
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    assert torch.bincount(data.train.labels).tolist() == [52, 51, 51, 51, 51]


def test_synthetic_images_depend_on_their_own_seed_only():
    torch.manual_seed(1)
    a = DATASETS.build({"name": "synthetic_images"}).load()
    torch.manual_seed(2)
    b = DATASETS.build({"name": "synthetic_images"}).load()
    c = DATASETS.build({"name": "synthetic_images", "seed": 1}).load()
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.inputs, c.train.inputs)


def test_synthetic_images_are_learnable():
    data = DATASETS.build({"name": "synthetic_images"}).load()
    flat = data.train.inputs.flatten(1)
    centroids = torch.stack([flat[data.train.labels == c].mean(0) for c in range(4)])
    guess = torch.cdist(data.test.inputs.flatten(1), centroids).argmin(1)
    assert (guess == data.test.labels).float().mean() > 0.9


def test_synthetic_images_options_are_checked():
    with pytest.raises(ValueError, match="synthetic_images: classes must be >= 1, got 0"):
        DATASETS.build({"name": "synthetic_images", "classes": 0})
