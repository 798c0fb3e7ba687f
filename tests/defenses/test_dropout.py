import pytest
import torch
from torch import nn

from fedleak import config, federation, seeding
from fedleak.core import Batch
from fedleak.defenses import DEFENSES
from fedleak.registry import ConfigError

TINY = {
    "seed": 1,
    "clients": 4,
    "clients_per_round": 2,
    "data": {"name": "synthetic_images", "examples": 32, "test_examples": 8},
    "model": {"name": "mlp", "hidden": [16]},
    "training": {"name": "sgd", "lr": 0.1, "batch_size": 4, "local_steps": 2},
}


def _update(*defenses: dict) -> federation.Update:
    exp = config.load({**TINY, "defenses": list(defenses)})
    return federation.local_update(exp, 0, 1, federation.initial_params(exp))


def _wrapped(model: nn.Module, seed: int = 0, **options) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _, _ = DEFENSES["dropout"](**options).wrap(model, optimizer, [], seeding.rng(seed))
    return model


def _mlp() -> nn.Module:
    with seeding.isolated(0, "mlp"):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def test_zero_p_trains_exactly_like_no_defense():
    plain, dropped = _update(), _update({"name": "dropout", "p": 0.0})
    assert all(torch.equal(plain.params[k], dropped.params[k]) for k in plain.params)
    assert plain.result.loss == dropped.result.loss


def test_dropout_changes_training_not_the_state_dict():
    plain, dropped = _update(), _update({"name": "dropout", "p": 0.5})
    assert list(dropped.params) == list(plain.params)
    for k, v in plain.params.items():
        assert dropped.params[k].shape == v.shape and dropped.params[k].dtype == v.dtype
    assert not torch.equal(plain.params["1.weight"], dropped.params["1.weight"])
    assert torch.equal(plain.truth.inputs, dropped.truth.inputs)  # same examples, other masks
    again = _update({"name": "dropout", "p": 0.5})
    assert all(torch.equal(again.params[k], dropped.params[k]) for k in again.params)


def test_masks_drop_p_of_the_inputs_and_rescale_the_rest():
    seen = []
    model = _wrapped(_mlp(), p=0.25)
    model[1].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.ones(500, 1, 8, 8)
    model.train()
    model(x)
    dropped = seen[-1] == 0
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(seen[-1][~dropped], torch.full_like(seen[-1][~dropped], 1 / 0.75))


def test_eval_mode_and_other_models_are_untouched():
    reference, model = _mlp(), _wrapped(_mlp(), p=0.5)
    x = torch.randn(3, 1, 8, 8, generator=seeding.rng(0))
    model.eval()
    assert torch.equal(model(x), reference(x))
    model.train()
    assert not torch.equal(model(x), reference(x))
    hooked = [m for m in model.modules() if m._forward_pre_hooks]
    assert hooked == [model[1], model[3]]
    assert not any(m._forward_pre_hooks for m in reference.modules())
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_hooks_stay_on_the_local_copy():
    exp = config.load({**TINY, "defenses": [{"name": "dropout"}]})
    sent = federation.initial_params(exp)
    model = exp.build_model()
    model.load_state_dict(sent)
    exp.trainer.fit(model, exp.client_data(0), exp.loss_fn, seeding.rng(0), exp.training_defenses)
    assert any(m._forward_pre_hooks for m in model.modules())  # the client's discarded copy
    assert not any(m._forward_pre_hooks for m in exp.build_model().modules())


@pytest.mark.parametrize("conv", [False, True])
def test_conv_option(conv):
    with seeding.isolated(0, "cnn"):
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 4))
    model = _wrapped(model, p=0.5, conv=conv)
    assert bool(model[0]._forward_pre_hooks) == conv and bool(model[2]._forward_pre_hooks)
    model.train()
    out = model(torch.ones(2, 1, 8, 8))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_masks_come_from_the_rng():
    x = torch.randn(4, 1, 8, 8, generator=seeding.rng(0))
    a, b, c = _wrapped(_mlp(), 1), _wrapped(_mlp(), 1), _wrapped(_mlp(), 2)
    for model in (a, b, c):
        model.train()
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))


def test_batches_and_optimizer_pass_through():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [Batch(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]
    out = DEFENSES["dropout"]().wrap(model, optimizer, batches, seeding.rng(0))
    assert out[0] is model and out[1] is optimizer and out[2] is batches


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan")])
def test_bad_p_raises(p):
    with pytest.raises(ValueError, match=r"dropout: p must be in \[0, 1\)"):
        DEFENSES["dropout"](p=p)
    with pytest.raises(ConfigError, match=r"dropout'?: p"):
        DEFENSES.build({"name": "dropout", "p": p})
