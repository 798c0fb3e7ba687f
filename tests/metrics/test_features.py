import math

import pytest
import torch
from torch import nn

from fedleak import metrics, seeding
from fedleak.core import Batch, Reconstruction, ServerView, Task
from fedleak.metrics.features import feature_cos, true_features

TASK = Task("image", (1, 4, 4), 3)


def _view_and_truth(norm: bool = False, size: int = 3):
    with seeding.isolated(0, "model"):
        layers = [nn.Flatten(), nn.Linear(16, 6)]
        layers += [nn.BatchNorm1d(6)] if norm else []
        model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(6, 3))
    g = seeding.rng(0, "data")
    truth = Batch(torch.randn(size, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0][:size]))
    return ServerView.from_local_step(model, truth, TASK), truth


def _features(view, truth, layer):
    return true_features(view, truth, layer).float()


def test_exact_features_score_one_whatever_the_order_sign_and_scale():
    view, truth = _view_and_truth()
    z = _features(view, truth, "3")
    assert z.shape == (3, 6)
    scrambled = torch.stack([-2 * z[2], 0.5 * z[0], z[1]])
    rec = Reconstruction(truth.inputs, features=scrambled, feature_layer="3")
    assert feature_cos(rec, truth, view) == pytest.approx(1.0)


def test_wrong_features_score_lower_and_match_optimally():
    view, truth = _view_and_truth()
    z = _features(view, truth, "3")
    noise = torch.randn(3, 6, generator=seeding.rng(1))
    rec = Reconstruction(truth.inputs, features=noise, feature_layer="3")
    unit = nn.functional.normalize
    cos = (unit(noise, dim=1) @ unit(z, dim=1).T).abs()
    best = max(
        float(cos[list(p), [0, 1, 2]].mean())
        for p in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0])
    )
    assert feature_cos(rec, truth, view) == pytest.approx(best)
    assert best < 0.99
    # fewer recovered features than examples: the best-matched ones count
    one = Reconstruction(truth.inputs, features=z[1:2], feature_layer="3")
    assert feature_cos(one, truth, view) == pytest.approx(1.0)


def test_features_come_from_train_mode():
    # With BatchNorm before the layer, the client's features used batch statistics.
    view, truth = _view_and_truth(norm=True)
    z = _features(view, truth, "4")
    model = view.model().eval()
    eval_features = []
    model[4].register_forward_pre_hook(lambda _, a: eval_features.append(a[0]))
    with torch.no_grad():
        model(truth.inputs)
    assert not torch.allclose(z, eval_features[0])
    rec = Reconstruction(truth.inputs, features=z, feature_layer="4")
    assert feature_cos(rec, truth, view) == pytest.approx(1.0)
    worse = Reconstruction(truth.inputs, features=eval_features[0], feature_layer="4")
    assert feature_cos(worse, truth, view) < 0.999


def test_score_reports_feature_cos_nan_without_features_or_view():
    view, truth = _view_and_truth()
    plain = metrics.score(Reconstruction(truth.inputs), truth, TASK, view=view)
    assert math.isnan(plain["feature_cos"]) and plain["psnr"] == 100
    z = _features(view, truth, "3")
    rec = Reconstruction(truth.inputs, features=z, feature_layer="3")
    assert math.isnan(metrics.score(rec, truth, TASK)["feature_cos"])
    assert metrics.score(rec, truth, TASK, view=view)["feature_cos"] == pytest.approx(1.0)


def test_bad_layer_or_shape_raises():
    view, truth = _view_and_truth()
    with pytest.raises(ValueError, match="no module 'head'"):
        feature_cos(
            Reconstruction(truth.inputs, features=torch.ones(3, 6), feature_layer="head"),
            truth,
            view,
        )
    with pytest.raises(ValueError, match=r"do not match the 6 inputs of '3'.*\[B, 6\]"):
        feature_cos(
            Reconstruction(truth.inputs, features=torch.ones(3, 5), feature_layer="3"), truth, view
        )


def test_dropout_is_off_so_the_score_is_deterministic():
    with seeding.isolated(0, "model"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    truth = Batch(torch.randn(3, 1, 4, 4, generator=seeding.rng(0)), torch.tensor([0, 1, 2]))
    view = ServerView.from_local_step(model, truth, TASK)
    with torch.no_grad():
        clean = view.model()[1](truth.inputs.flatten(1))
    state = torch.get_rng_state()
    rec = Reconstruction(truth.inputs, features=clean, feature_layer="3")
    assert feature_cos(rec, truth, view) == pytest.approx(1.0)
    assert torch.equal(state, torch.get_rng_state())
