import numpy as np
import torch

from fedleak.data import DATASETS, _sources


def test_digits_shapes_sizes_and_pixel_range():
    data = DATASETS.build({"name": "digits"}).load()
    assert data.task.input_shape == (1, 8, 8) and data.task.num_classes == 10
    assert data.train.inputs.shape[1:] == (1, 8, 8)
    assert data.train.inputs.dtype == torch.float32 and data.train.labels.dtype == torch.int64
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == round(1797 * 0.2)
    pixels = data.task.to_pixels(data.train.inputs)
    assert pixels.min() == 0 and torch.isclose(pixels.max(), torch.tensor(1.0))
    # to_pixels clamps, so check the values themselves: sklearn's 0..16 levels, undone exactly
    raw = data.train.inputs * data.task.std[0] + data.task.mean[0]
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-4)
    assert set(data.train.labels.tolist()) == set(range(10))


def test_digits_normalisation_constants_match_the_data():
    data = DATASETS.build({"name": "digits"}).load()
    inputs = torch.cat([data.train.inputs, data.test.inputs])
    assert abs(inputs.mean().item()) < 1e-3 and abs(inputs.std().item() - 1) < 1e-3


def test_digits_split_is_fixed_and_disjoint():
    train, test = _sources.split_indices(1797, 0.2, "digits")
    assert len(np.intersect1d(train, test)) == 0
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    again_train, _ = _sources.split_indices(1797, 0.2, "digits")
    assert np.array_equal(train, again_train)
    torch.manual_seed(123)  # the experiment's global seed must not matter
    first = DATASETS.build({"name": "digits"}).load()
    torch.manual_seed(456)
    second = DATASETS.build({"name": "digits"}).load()
    assert torch.equal(first.test.inputs, second.test.inputs)
    assert torch.equal(first.train.labels, second.train.labels)


def test_digits_test_fraction_is_checked():
    import pytest

    with pytest.raises(ValueError, match=r"digits: test_fraction must be in \(0, 1\), got 1.5"):
        DATASETS.build({"name": "digits", "test_fraction": 1.5})
