import numpy as np
import pytest
import torch

from fedleak.data import DATASETS
from fedleak.registry import ConfigError


def test_groups_follow_the_label_in_training_and_are_balanced_in_test():
    source = DATASETS["waterbirds_lite"](size=8)
    data = source.load()
    train, test = source.pools
    assert len(test.labels) == len(data.test)
    assert data.train.inputs.shape == (len(train.labels), 3, 8, 8)
    assert data.task.num_classes == 2 and data.task.input_shape == (3, 8, 8)
    np.testing.assert_array_equal(data.train.labels.numpy(), train.labels)
    assert abs(np.mean(train.attributes == train.labels) - 0.95) < 0.03
    counts = np.bincount(source.groups("test"), minlength=4)
    assert counts.max() - counts.min() <= 2  # every test digit on both textures
    assert len(source.groups("train")) == len(data.train)
    # normalised with the pool's own statistics
    assert data.train.inputs.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_deterministic_and_textures_visible():
    a, b = (
        DATASETS["waterbirds_lite"](size=8).pools[0],
        DATASETS["waterbirds_lite"](size=8).pools[0],
    )
    np.testing.assert_array_equal(a.images, b.images)
    # green grass vs red brick: the background's colour alone tells the attribute
    red_minus_green = a.images[:, 0].mean((1, 2)) - a.images[:, 1].mean((1, 2))
    assert (red_minus_green[a.attributes == 1].min()) > red_minus_green[a.attributes == 0].max()


def test_three_textures_make_six_groups():
    source = DATASETS["waterbirds_lite"](size=8, textures=("grass", "brick", "gravel"))
    assert source.num_groups == 6
    assert set(np.unique(source.groups("train"))) <= set(range(6))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"textures": ["grass"]}, "2 or 3 distinct names"),
        ({"textures": ["grass", "sand"]}, "2 or 3 distinct names"),
        ({"correlation": 1.5}, r"in \[0, 1\]"),
        ({"size": 4}, "size must be in 8..64"),
        ({"test_fraction": 1.0}, "test_fraction must be in"),
    ],
)
def test_bad_options_are_one_clear_error(options, match):
    with pytest.raises(ConfigError, match=match):
        DATASETS.build({"name": "waterbirds_lite", **options}, "data")


def test_group_ids_ride_with_the_examples():
    source = DATASETS["waterbirds_lite"](size=8)
    data = source.load()
    assert torch.equal(data.train.groups, torch.from_numpy(source.groups("train")))
    assert torch.equal(data.test.groups, torch.from_numpy(source.groups("test")))
    picked = data.train.select(torch.tensor([5, 0, 3]))
    assert torch.equal(picked.groups, data.train.groups[[5, 0, 3]])
    assert torch.equal(picked.labels, data.train.labels[[5, 0, 3]])
