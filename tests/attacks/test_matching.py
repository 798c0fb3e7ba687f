import dataclasses

import pytest
import torch
from torch import nn

from fedleak import seeding
from fedleak.attacks._matching import Update, distance, layer_weights, total_variation
from fedleak.core import Batch, ServerView, Task
from fedleak.training import TRAINERS

TASK = Task("image", (1, 8, 8), 10, mean=(0.5,), std=(0.5,))


def _model(norm: bool = False) -> nn.Module:
    with seeding.isolated(0, "model"):
        layers = [nn.Conv2d(1, 4, 3, padding=1)]
        layers += [nn.BatchNorm2d(4)] if norm else []
        layers += [nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)]
        return nn.Sequential(*layers)


def _federated_view(
    local_steps: int, batch_size: int, momentum: float = 0.0, norm=False, batch_norm="train"
):
    """A view after a real local-SGD round of fedleak's trainer, and the examples it used."""
    g = seeding.rng(0, "data")
    data = Batch(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g))
    model = _model(norm)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TRAINERS["sgd"](
        lr=0.05,
        local_steps=local_steps,
        batch_size=batch_size,
        momentum=momentum,
        batch_norm=batch_norm,
    )
    result = trainer.fit(model, data, nn.functional.cross_entropy, seeding.rng(0, "train"))
    view = ServerView(
        round=1,
        client=0,
        task=TASK,
        build_model=lambda: _model(norm),
        loss_fn=nn.functional.cross_entropy,
        sent=sent,
        received={k: v.clone() for k, v in model.state_dict().items()},
        num_examples=len(result.used),
        lr=0.05,
        local_steps=result.steps,
        batch_size=result.batch_size,
        protocol={"name": "sgd", "momentum": momentum, "batch_norm": batch_norm},
    )
    return view, result.used


def _relative_error(predicted, observed):
    num = sum((p - o).pow(2).sum() for p, o in zip(predicted, observed, strict=True))
    den = sum(o.pow(2).sum() for o in observed)
    return float((num / den).sqrt())


@pytest.mark.parametrize(
    ("steps", "batch_size", "momentum", "norm", "batch_norm"),
    [
        (1, 0, 0.0, False, "train"),
        (3, 2, 0.0, False, "train"),
        (3, 2, 0.9, False, "train"),
        (3, 2, 0.0, True, "train"),
        (1, 1, 0.0, True, "train"),
        (1, 1, 0.0, True, "eval"),
        (3, 2, 0.0, True, "eval"),
    ],
)
def test_true_batch_reproduces_the_observed_update(steps, batch_size, momentum, norm, batch_norm):
    # The server's model of local training, fed the examples in the order the client used
    # them, must predict the update the client sent (FedSGD, FedAvg, momentum, BatchNorm in
    # either mode of the client step).
    view, used = _federated_view(steps, batch_size, momentum, norm, batch_norm)
    update = Update(view)
    assert update.unrolled == (steps > 1)
    predicted = [p.detach() for p in update(used.inputs, used.labels)]
    assert _relative_error(predicted, update.observed) < 1e-5


def test_not_unrolling_a_fedavg_update_is_only_an_estimate():
    view, used = _federated_view(3, 2)
    predicted = [p.detach() for p in Update(view, unroll=False)(used.inputs, used.labels)]
    # One gradient on the whole batch vs three sequential steps: close, but not exact.
    assert 1e-4 < _relative_error(predicted, Update(view).observed) < 0.5


def test_prediction_is_differentiable_in_the_inputs():
    view, used = _federated_view(3, 2)
    update = Update(view)
    x = used.inputs.clone().requires_grad_()
    loss = distance(update(x, used.labels), update.observed, "l2")
    (grad,) = torch.autograd.grad(loss, [x])
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_distances():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    assert float(distance(a, a, "l2")) == 0
    assert float(distance(a, a, "cosine")) == pytest.approx(0, abs=1e-7)
    scaled = [3 * t for t in a]
    assert float(distance(scaled, a, "cosine")) == pytest.approx(0, abs=1e-7)  # scale-free
    assert float(distance(scaled, a, "l2")) == pytest.approx(4 * 5)
    assert float(distance(scaled, a, "l2_l1", l1=0.5)) == pytest.approx(20 + 0.5 * 6)
    opposite = [-t for t in a]
    assert float(distance(opposite, a, "cosine")) == pytest.approx(2)
    with pytest.raises(ValueError, match="distance 'l3' unknown"):
        distance(a, a, "l3")


def test_layer_weights():
    for scheme in ("equal", "linear", "exp"):
        w = layer_weights(5, scheme)
        assert w.sum().item() == pytest.approx(5)
        assert (w[:-1] >= w[1:]).all()  # never favour later layers
    assert torch.equal(layer_weights(3), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="layer weights 'log' unknown"):
        layer_weights(3, "log")


def test_total_variation():
    flat = torch.ones(1, 1, 4, 4)
    assert float(total_variation(flat)) == 0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1
    assert float(total_variation(stripes)) == pytest.approx(1.0)  # every horizontal step is 1


def test_unroll_option():
    view, _ = _federated_view(1, 0)
    assert not Update(view).unrolled
    assert Update(view, unroll=True).unrolled
    view3 = dataclasses.replace(view, local_steps=3)
    assert not Update(view3, unroll=False).unrolled


def test_the_attack_must_know_the_batch_norm_mode():
    # Matching an eval-mode client step with a train-mode model (or back) is wrong: the mode is
    # part of the protocol the view carries, not a detail.
    view, used = _federated_view(1, 1, norm=True, batch_norm="eval")
    wrong = dataclasses.replace(view, protocol={**view.protocol, "batch_norm": "train"})
    right = Update(view)
    predicted = [p.detach() for p in Update(wrong)(used.inputs, used.labels)]
    assert _relative_error(predicted, right.observed) > 0.1
