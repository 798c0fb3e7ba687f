import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from fedleak import metrics, seeding
from fedleak.core import Batch, Reconstruction, Task
from fedleak.metrics import image
from fedleak.metrics.grid import save_grid

GRAY = Task("image", (1, 8, 8), 10)  # pixels are the inputs
RGB = Task("image", (3, 8, 8), 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _batch(task: Task, size: int = 4, seed: int = 0) -> Batch:
    g = seeding.rng(seed, "truth")
    pixels = torch.rand((size, *task.input_shape), generator=g)
    mean = torch.tensor(task.mean or (0.0,)).view(1, -1, 1, 1)
    std = torch.tensor(task.std or (1.0,)).view(1, -1, 1, 1)
    labels = torch.randint(0, task.num_classes, (size,), generator=g)
    return Batch((pixels - mean) / std, labels)


@pytest.mark.parametrize("task", [GRAY, RGB])
def test_identical_reconstruction_is_perfect(task):
    truth = _batch(task)
    result = metrics.score(Reconstruction(truth.inputs.clone(), truth.labels.clone()), truth, task)
    assert result["mse"] == pytest.approx(0, abs=1e-12)
    assert result["psnr"] >= 90 and result["psnr_max"] >= 90
    assert result["ssim"] == pytest.approx(1, abs=1e-6)
    assert result["label_acc"] == 1 and result["label_acc_matched"] == 1
    assert all(isinstance(v, float) for v in result.values())


def test_permuted_reconstruction_is_matched():
    truth = _batch(RGB, size=5)
    noisy = truth.inputs + 0.1 * torch.randn(truth.inputs.shape, generator=seeding.rng(0, "n"))
    plain = metrics.score(Reconstruction(noisy, truth.labels), truth, RGB)
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = metrics.score(Reconstruction(noisy[perm], truth.labels[perm]), truth, RGB)
    assert permuted == pytest.approx(plain, nan_ok=True)  # lpips, feature_cos: NaN here
    assert permuted["label_acc_matched"] == 1


def test_match_returns_pairs_sorted_by_truth():
    truth = _batch(GRAY, size=4).inputs
    rec_idx, true_idx = image.match(truth[[2, 0, 3, 1]], truth)
    assert true_idx.tolist() == [0, 1, 2, 3]
    assert rec_idx.tolist() == [1, 3, 0, 2]


def test_unequal_counts_match_the_smaller():
    truth = _batch(GRAY, size=4)
    # Two reconstructions, equal to truths 3 and 1.
    rec = Reconstruction(truth.inputs[[3, 1]], truth.labels[[3, 1]])
    result = metrics.score(rec, truth, GRAY)
    assert result["psnr"] >= 90
    assert result["label_acc_matched"] == 1
    assert result["label_acc"] == pytest.approx(0.5)  # 2 of 4 true labels recovered
    rec_idx, true_idx = image.match(GRAY.to_pixels(rec.inputs), GRAY.to_pixels(truth.inputs))
    assert sorted(zip(true_idx.tolist(), rec_idx.tolist(), strict=True)) == [(1, 1), (3, 0)]


def test_label_acc_is_order_free_and_matched_is_not():
    truth = _batch(GRAY, size=4)
    labels = torch.tensor([0, 1, 2, 3])
    truth = Batch(truth.inputs, labels)
    # Images in place, labels rotated: the multisets agree, the matched pairs do not.
    result = metrics.score(Reconstruction(truth.inputs, labels.roll(1)), truth, GRAY)
    assert result["label_acc"] == 1
    assert result["label_acc_matched"] == 0


def test_labels_none_gives_nan():
    truth = _batch(GRAY)
    result = metrics.score(Reconstruction(truth.inputs), truth, GRAY)
    assert math.isnan(result["label_acc"]) and math.isnan(result["label_acc_matched"])


def test_noise_lowers_psnr_monotonically():
    truth = _batch(GRAY, size=3)
    noise = torch.randn(truth.inputs.shape, generator=seeding.rng(0, "noise"))
    psnrs = [
        metrics.score(Reconstruction(truth.inputs + s * noise), truth, GRAY)["psnr"]
        for s in (0.01, 0.03, 0.1, 0.3)
    ]
    assert psnrs == sorted(psnrs, reverse=True)
    assert len(set(psnrs)) == len(psnrs)


@pytest.mark.parametrize("task", [GRAY, RGB])
def test_ssim_agrees_with_skimage(task):
    truth = _batch(task, size=1)
    noisy = truth.inputs + torch.randn(truth.inputs.shape, generator=seeding.rng(1))
    result = metrics.score(Reconstruction(noisy), truth, task)
    a = task.to_pixels(noisy.double())[0].permute(1, 2, 0).numpy()
    b = task.to_pixels(truth.inputs.double())[0].permute(1, 2, 0).numpy()
    direct = structural_similarity(a, b, data_range=1.0, win_size=7, channel_axis=-1)
    assert result["ssim"] == pytest.approx(direct, abs=1e-9)
    assert result["ssim"] < 0.9


def test_ssim_on_images_smaller_than_the_default_window():
    task = Task("image", (1, 4, 5), 10)
    truth = _batch(task, size=2)
    assert metrics.score(Reconstruction(truth.inputs), truth, task)["ssim"] == pytest.approx(1)


def test_unknown_modality_lists_known_ones():
    audio = Task("audio", (16,), 2)
    with pytest.raises(ValueError, match="No metrics for modality 'audio'; known: image, text"):
        metrics.score(
            Reconstruction(torch.zeros(1, 16)), Batch(torch.zeros(1, 16), torch.zeros(1)), audio
        )


@pytest.mark.parametrize("task", [GRAY, RGB])
def test_grid_png(tmp_path, task):
    truth = _batch(task, size=3)
    rec = Reconstruction(truth.inputs[[2, 0, 1]] + 0.05)
    path = tmp_path / "grid.png"
    save_grid(path, truth, rec, task)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left behind

    png = Image.open(path)
    assert png.mode == ("L" if task.input_shape[0] == 1 else "RGB")
    # 8x8 upscaled 8x to 64 px, three columns and two rows with 2-px gaps.
    assert png.size == (3 * 64 + 2 * 2, 2 * 64 + 2)

    pixels = np.asarray(png)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    expected = (task.to_pixels(truth.inputs[0:1])[0].permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_array_equal(pixels[0:64:8, 0:64:8], expected.astype(np.uint8))
    # Nearest-neighbour upscaling: each source pixel is an 8x8 block.
    np.testing.assert_array_equal(pixels[:64, :64], expected.repeat(8, 0).repeat(8, 1))
    # Column 0, bottom row: the reconstruction matched to truth 0 (rec 1 = truth 0 + 0.05).
    bottom = (task.to_pixels(rec.inputs[1:2])[0].permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_array_equal(pixels[66:130:8, 0:64:8], bottom.astype(np.uint8))


def test_match_rejects_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        image.match(torch.zeros(2, 1, 8, 8), torch.zeros(2, 4, 4, 4))
