"""The wide-pooler modifier: deterministic architecture, original units kept, secrets planted."""

import copy

import pytest
import torch

from fedleak import seeding
from fedleak.modifiers import MODIFIERS
from fedleak.registry import ConfigError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base(text):
    return text.model().eval()


def _ids(count=3, length=12):
    g = seeding.rng(0, "ids")
    ids = torch.randint(1000, 5000, (count, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return ids


def _pooled(model, ids):
    """The pooler's output (after its activation) and the logits."""
    captured = []
    pooler = model.hf.bert.pooler
    handle = pooler.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        logits = model(ids)
    handle.remove()
    return captured[0], logits


def test_architecture_is_deterministic_and_leaves_the_global_rng_alone(base):
    modifier = MODIFIERS["pooler"](hd=64, rd=8)
    state = torch.random.get_rng_state()
    a = modifier.architecture(copy.deepcopy(base)).state_dict()
    b = modifier.architecture(copy.deepcopy(base)).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.keys() == b.keys() == base.state_dict().keys()  # same names, wider tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["hf.bert.pooler.dense.weight"].shape == (32 + 64, 32)
    assert a["hf.classifier.weight"].shape == (2, 32 + 64)
    assert a["hf.bert.pooler.dense.weight"][32:].abs().sum() == 0  # zeros until planted


@pytest.mark.parametrize("activation", ["selu", "x3x2", "tanh", "relu"])
def test_the_original_units_are_kept_and_the_extra_rows_planted(base, activation):
    modifier = MODIFIERS["pooler"](hd=64, rd=8, activation=activation)
    wide, secrets = modifier.install(base, seeding.rng(1))
    ids = _ids()
    before, _ = _pooled(base, ids)
    after, logits = _pooled(wide.eval(), ids)
    assert after.shape == (3, 32 + 64)
    assert torch.allclose(after[:, :32], before, atol=1e-6)  # the original pooler, untouched
    assert torch.isfinite(logits).all()
    state = wide.state_dict()
    weight, bias = state["hf.bert.pooler.dense.weight"], state["hf.bert.pooler.dense.bias"]
    xi, scale = secrets["pooler.xi"], float(secrets["pooler.scale"])
    assert xi.shape == (64, 8) and scale == pytest.approx(8**-0.5)
    assert torch.allclose(weight[32:, :8], scale * xi) and weight[32:, 8:].abs().sum() == 0
    assert bias[32:].abs().sum() == 0
    head = state["hf.classifier.weight"][:, 32:]
    assert torch.allclose(head, torch.tensor([[1 / 64], [2 / 64]]).expand(2, 64))
    assert int(secrets["pooler.hd"]) == 64 and int(secrets["pooler.width"]) == 32
    # the extra units' activation
    from fedleak.attacks._tensor import ACTIVATIONS

    pre = torch.nn.functional.linear(_cls_state(wide, ids), weight, bias)[:, 32:]
    assert torch.allclose(after[:, 32:], ACTIVATIONS[activation](pre), atol=1e-5)


def _cls_state(model, ids):
    captured = []
    handle = model.hf.bert.pooler.dense.register_forward_pre_hook(
        lambda m, args: captured.append(args[0])
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured[0]


def test_the_tap_sees_exactly_the_coordinates_the_extra_units_read(base):
    wide, _ = MODIFIERS["pooler"](hd=16, rd=8).install(base, seeding.rng(0))
    seen = []
    wide.get_submodule(f"{wide.pooler_layer}.tap").register_forward_pre_hook(
        lambda m, args: seen.append(args[0])
    )
    ids = _ids(2)
    _pooled(wide, ids)
    assert torch.equal(seen[0], _cls_state(wide, ids)[:, :8])


def test_fresh_rows_per_round_from_the_rng(base):
    modifier = MODIFIERS["pooler"](hd=16, rd=4)
    wide = modifier.architecture(copy.deepcopy(base))
    params = dict(wide.state_dict())
    _, s1 = modifier(params, 1, seeding.rng(0, 1))
    _, s2 = modifier(params, 1, seeding.rng(0, 1))
    _, s3 = modifier(params, 2, seeding.rng(0, 2))
    assert torch.equal(s1["pooler.xi"], s2["pooler.xi"])
    assert not torch.equal(s1["pooler.xi"], s3["pooler.xi"])
    assert modifier.applies_to(5) and not MODIFIERS["pooler"](rounds=(1,)).applies_to(2)


def test_honest_ablation_changes_nothing(base):
    modifier = MODIFIERS["pooler"](hd=0)
    model = copy.deepcopy(base)
    assert modifier.architecture(model) is model
    params = dict(model.state_dict())
    sent, secrets = modifier(params, 1, seeding.rng(0))
    assert sent is params and int(secrets["pooler.hd"]) == 0 and len(secrets) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hd": -1}, "hd must be >= 0"),
        ({"rd": 0}, "rd must be >= 1"),
        ({"activation": "gelu"}, "activation 'gelu' unknown"),
        ({"scale": -1.0}, "scale must be >= 0"),
        ({"rounds": [0]}, "rounds must all be >= 1"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        MODIFIERS.build({"name": "pooler", **options})


def test_rd_wider_than_the_pooler_input_is_an_error(base):
    with pytest.raises(ValueError, match="rd=64 exceeds the pooler's input width 32"):
        MODIFIERS["pooler"](rd=64).architecture(copy.deepcopy(base))


def test_a_model_without_a_pooler_is_an_error():
    from torch import nn

    with pytest.raises(ValueError, match="names no pooler or classifier layer"):
        MODIFIERS["pooler"]().architecture(nn.Linear(4, 2))
