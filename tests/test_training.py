import pytest
import torch
from torch import nn

from fedleak.core import Batch
from fedleak.registry import ConfigError
from fedleak.training import TRAINERS


def data(n=7):
    return Batch(torch.randn(n, 3), torch.arange(n) % 2)


def test_fedsgd_step_is_lr_times_full_batch_gradient():
    trainer = TRAINERS.build({"name": "sgd", "lr": 0.2})
    torch.manual_seed(0)
    model, batch = nn.Linear(3, 2), data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nn.functional.cross_entropy(model(batch.inputs), batch.labels).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    result = trainer.fit(
        model, batch, nn.functional.cross_entropy, torch.Generator().manual_seed(0)
    )
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - 0.2 * grads[k])
    assert result.steps == 1 and result.batch_size == 7 and len(result.used) == 7


def test_epochs_visit_every_example_and_truth_is_first_use_order():
    trainer = TRAINERS.build({"name": "sgd", "local_epochs": 2, "batch_size": 3})
    batch = data()
    batches = trainer.batches(batch, torch.Generator().manual_seed(1))
    assert [len(b) for b in batches] == [3, 3, 1, 3, 3, 1]
    result = trainer.fit(
        nn.Linear(3, 2), batch, nn.functional.cross_entropy, torch.Generator().manual_seed(1)
    )
    assert sorted(result.used.inputs[:, 0].tolist()) == sorted(batch.inputs[:, 0].tolist())
    torch.testing.assert_close(result.used.inputs[:3], batches[0].inputs)


def test_steps_mode_and_determinism():
    trainer = TRAINERS.build({"name": "sgd", "local_steps": 4, "batch_size": 2})
    a = trainer.batches(data(), torch.Generator().manual_seed(5))
    b = trainer.batches(data(), torch.Generator().manual_seed(5))
    assert len(a) == 4 and all(torch.equal(x.labels, y.labels) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "bad", [{"lr": 0}, {"local_steps": 0}, {"batch_size": -1}, {"momentum": 1.0}]
)
def test_bad_options(bad):
    with pytest.raises(ConfigError, match="sgd: "):
        TRAINERS.build({"name": "sgd", **bad})


class FirstExampleOnly:
    """A training defense that trains on the first example of every batch only."""

    def wrap(self, model, optimizer, batches, rng, *, data):
        return model, optimizer, [Batch(b.inputs[:1], b.labels[:1]) for b in batches]


def test_training_defenses_wrap_the_batches_and_the_truth_follows():
    trainer = TRAINERS.build({"name": "sgd", "local_steps": 2, "batch_size": 3})
    batch = data()
    result = trainer.fit(
        nn.Linear(3, 2),
        batch,
        nn.functional.cross_entropy,
        torch.Generator().manual_seed(0),
        (FirstExampleOnly(),),
    )
    assert result.steps == 2 and result.batch_size == 1 and len(result.used) == 2


class HalveGradients:
    """A gradient defense that halves every gradient (so one step moves half as far)."""

    def gradients(self, model, batch, loss_fn, grads, rng):
        assert len(batch) == 7
        return {k: g / 2 for k, g in grads.items()}


def test_gradient_defenses_act_on_each_step_with_the_batch():
    trainer = TRAINERS.build({"name": "sgd", "lr": 0.2})
    torch.manual_seed(0)
    plain, defended = nn.Linear(3, 2), nn.Linear(3, 2)
    defended.load_state_dict(plain.state_dict())
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    args = (data(), nn.functional.cross_entropy, torch.Generator().manual_seed(0))
    trainer.fit(plain, *args)
    trainer.fit(defended, *args, (HalveGradients(),))
    for k in before:
        torch.testing.assert_close(
            defended.state_dict()[k] - before[k], (plain.state_dict()[k] - before[k]) / 2
        )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_mode_of_the_local_step(mode):
    # eval: the sent running statistics normalise (and stay as sent); train: the batch's own,
    # and the running statistics move.  Dropout is on in both.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TRAINERS.build({"name": "sgd", "lr": 0.1, "batch_norm": mode})
    trainer.fit(model, data(), nn.functional.cross_entropy, torch.Generator().manual_seed(0))
    moved = not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])
    assert moved == (mode == "train")
    assert model[1].training == (mode == "train") and model[2].training


def test_batch_norm_mode_is_checked():
    with pytest.raises(ConfigError, match="batch_norm must be one of 'train', 'eval'"):
        TRAINERS.build({"name": "sgd", "batch_norm": "frozen"})
