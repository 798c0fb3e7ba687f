import math

import pytest
import torch
from torch import nn

from fedleak import seeding
from fedleak.attacks._tensor import recover_features
from fedleak.core import Batch, ModelModifier, ServerView, Task
from fedleak.models import MODELS
from fedleak.modifiers import MODIFIERS
from fedleak.modifiers.gaussian_head import X3X2, Head, locate
from fedleak.registry import ConfigError

DIGITS = Task("image", (1, 8, 8), 10)
# The image models, small; text models (BERT) have their own malicious head (modifier pooler).
SMALL = {"mlp": {}, "lenet": {}, "convnet": {"width": 2}, "resnet18": {"width": 2}}


def _model(name: str) -> nn.Module:
    with seeding.isolated(0, "model"):
        return MODELS[name](**SMALL[name])(DIGITS)


def test_is_an_adversarial_modifier():
    modifier = MODIFIERS["gaussian_head"]()
    assert isinstance(modifier, ModelModifier)
    assert modifier.adversarial is True
    assert modifier.applies_to(1) and modifier.applies_to(7)
    assert MODIFIERS["gaussian_head"](rounds=(2,)).applies_to(2)
    assert not MODIFIERS["gaussian_head"](rounds=(2,)).applies_to(1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_image_model_gets_a_head_in_front_of_its_classifier(name):
    plain = _model(name)
    classifier = [m for m in plain.modules() if isinstance(m, nn.Linear)][-1]
    modifier = MODIFIERS["gaussian_head"](width=40, activation="tanh")
    state = torch.get_rng_state()
    model = modifier.architecture(_model(name))
    assert torch.equal(state, torch.get_rng_state())  # the global stream is left alone

    head = locate(model)
    assert (head.features, head.width, head.activation) == (classifier.in_features, 40, "tanh")
    assert head.hidden == f"{head.path}.hidden" and head.out == f"{head.path}.out"
    assert isinstance(model.get_submodule(head.path), Head)
    assert model.get_submodule(head.out).out_features == DIGITS.num_classes
    x = torch.randn(3, *DIGITS.input_shape)
    model.eval()
    assert model(x).shape == plain.eval()(x).shape == (3, DIGITS.num_classes)

    params, secrets = modifier(model.state_dict(), 1, seeding.rng(0, "modifier"))
    xi, scale = secrets["gaussian_head.xi"], float(secrets["gaussian_head.xi_scale"])
    assert xi.shape == (40, classifier.in_features)
    assert scale == pytest.approx(2 / math.sqrt(classifier.in_features))
    assert torch.allclose(params[f"{head.hidden}.weight"], scale * xi)
    assert torch.equal(params[f"{head.hidden}.bias"], torch.zeros(40))
    # Built again on another "node": the same module and initial weights; the planted state
    # loads into it.
    again = modifier.architecture(_model(name))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    again.load_state_dict(params)


def test_planting_is_gaussian_fresh_per_rng_and_leaves_the_rest():
    modifier = MODIFIERS["gaussian_head"](width=3000)
    model = modifier.architecture(_model("mlp"))
    params = model.state_dict()
    a, secrets = modifier(params, 1, seeding.rng(0, "m"))
    b, _ = modifier(params, 1, seeding.rng(0, "m"))
    c, _ = modifier(params, 2, seeding.rng(1, "m"))
    xi = secrets["gaussian_head.xi"]
    assert abs(float(xi.mean())) < 0.01 and float(xi.std()) == pytest.approx(1, abs=0.01)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["3.hidden.weight"], c["3.hidden.weight"])
    assert all(torch.equal(a[k], params[k]) for k in params if not k.startswith("3.hidden"))
    assert not torch.equal(params["3.hidden.weight"], a["3.hidden.weight"])  # input untouched


def test_x3x2_activation_and_scale_options():
    modifier = MODIFIERS["gaussian_head"](width=10, activation="x3x2")
    model = modifier.architecture(_model("mlp"))
    assert isinstance(model.get_submodule("3.activation"), X3X2)
    t = torch.tensor([-2.0, 0.0, 1.5])
    assert torch.equal(X3X2()(t), t**3 + t**2)
    _, secrets = modifier(model.state_dict(), 1, torch.Generator())
    assert float(secrets["gaussian_head.xi_scale"]) == pytest.approx(1 / math.sqrt(128))
    fixed = MODIFIERS["gaussian_head"](width=10, activation="x3x2", scale=0.5)
    assert (
        float(fixed(model.state_dict(), 1, torch.Generator())[1]["gaussian_head.xi_scale"]) == 0.5
    )


def _one_example(seed):
    """|cos| of the recovered feature with the true one and with 4 other inputs' features."""
    modifier = MODIFIERS["gaussian_head"](width=20000)
    with seeding.isolated(seed, "model"):
        model = MODELS["mlp"](hidden=(32,), activation="tanh")(DIGITS)
    model = modifier.architecture(model)
    params, secrets = modifier(model.state_dict(), 1, seeding.rng(seed, "modifier"))
    model.load_state_dict(params)
    g = seeding.rng(seed, "data")
    inputs = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    one = Batch(inputs[:1], torch.randint(0, 10, (1,), generator=g))
    view = ServerView.from_local_step(model, one, DIGITS)
    head = locate(model)
    gradient = view.gradient()
    label = int(gradient[f"{head.out}.bias"].argmin())  # the one negative entry
    assert label == int(one.labels[0])
    weights = view.sent[f"{head.out}.weight"][label]  # a_jc of the label's output unit
    found = recover_features(
        secrets["gaussian_head.xi"],
        1,
        first=gradient[f"{head.hidden}.weight"] * weights[:, None],
        activation="selu",
        rng=torch.Generator(),
    )
    features = []
    hook = model.get_submodule(head.hidden).register_forward_pre_hook(
        lambda _, args: features.append(args[0].detach())
    )
    with torch.no_grad():
        model(inputs)
    hook.remove()
    true = nn.functional.normalize(features[0], dim=1)
    return (nn.functional.normalize(found.directions, dim=1) @ true.T).abs()[0]


def test_head_reveals_the_feature_of_one_example():
    # End to end on a real model: an MLP with tanh features, one example, 20,000 units.  The
    # classifier's columns differ per unit, so the first layer's rows are weighted by the
    # label's column.  Measured over seeds 0-4: |cos| 0.87-0.98 with the true feature, against
    # at most 0.21-0.58 with other inputs' features (which are not all alike).
    cos = _one_example(0)
    assert cos[0] > 0.85
    assert cos[0] > cos[1:].max() + 0.3


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("width", 0, "gaussian_head: width must be >= 1"),
        ("activation", "gelu", "activation must be one of 'relu', 'selu', 'tanh', 'x3x2'"),
        ("scale", -1.0, "gaussian_head: scale must be >= 0"),
        ("rounds", (0,), "gaussian_head: rounds must all be >= 1"),
    ],
)
def test_bad_options_raise(option, value, message):
    with pytest.raises(ConfigError, match=message):
        MODIFIERS.build({"name": "gaussian_head", option: value})


def test_misuse_raises():
    modifier = MODIFIERS["gaussian_head"](width=5)
    model = modifier.architecture(_model("mlp"))
    with pytest.raises(ValueError, match="already has a Gaussian head"):
        modifier.architecture(model)
    with pytest.raises(ValueError, match="has 5 units but width = 6"):
        MODIFIERS["gaussian_head"](width=6)(model.state_dict(), 1, torch.Generator())
    with pytest.raises(ValueError, match="expected one Gaussian head"):
        locate(_model("mlp"))
    with pytest.raises(ValueError, match="expected one head"):
        modifier(_model("mlp").state_dict(), 1, torch.Generator())
    with pytest.raises(
        ValueError, match=r"gaussian_head needs a fully connected classifier \(an nn\.Linear\)"
    ):
        modifier.architecture(nn.Sequential(nn.Conv2d(1, 2, 3)))
    # A bare linear model becomes the head itself.
    bare = modifier.architecture(nn.Linear(64, 10))
    assert isinstance(bare, Head) and locate(bare).path == ""
    planted, _ = modifier(bare.state_dict(), 1, torch.Generator())
    assert torch.equal(planted["hidden.bias"], torch.zeros(5))
