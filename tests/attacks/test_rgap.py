import warnings

import pytest
import skimage.data
import torch
from torch import nn
from torch.nn import functional

from fedleak import config, seeding
from fedleak.attacks import ATTACKS
from fedleak.attacks.rgap import UnderdeterminedWarning, rank_analysis
from fedleak.core import Attack, Batch, ServerView, Setting, Task
from fedleak.metrics import score
from fedleak.models import MODELS
from fedleak.registry import ConfigError
from fedleak.training import TRAINERS

CIFAR = Task("image", (3, 32, 32), 10, mean=(0.5,) * 3, std=(0.5,) * 3)
DIGITS = Task("image", (1, 8, 8), 10, mean=(0.5,), std=(0.5,))


def _photo() -> Batch:
    """scikit-image's astronaut, downsampled to a 32x32 CIFAR-shaped image, label 3."""
    pixels = torch.tensor(skimage.data.astronaut()).permute(2, 0, 1)[None].double() / 255
    pixels = functional.interpolate(pixels, size=(32, 32), mode="area").float()
    return Batch((pixels - 0.5) / 0.5, torch.tensor([3]))


def _digit(seed: int) -> Batch:
    g = seeding.rng(seed, "data")
    return Batch(
        torch.rand((1, 1, 8, 8), generator=g) * 2 - 1, torch.randint(0, 10, (1,), generator=g)
    )


def _model(task: Task, seed: int = 0, **options) -> nn.Module:
    with seeding.isolated(seed, "model"):
        return MODELS["rgap_cnn"](**options)(task)


def _attack(view: ServerView):
    """The attack, failing on any under-determined layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderdeterminedWarning)
        return ATTACKS["rgap"]()(view, seeding.rng(0))


def _setting(model: nn.Module, task: Task = DIGITS, batch_size: int = 1, **training) -> Setting:
    trainer = TRAINERS["sgd"](batch_size=batch_size, **training)
    return Setting(task, model, trainer)


@pytest.mark.slow  # ~17 s: CNN6 on a 32x32 photo (the digits tests cover the fast path)
def test_recovers_a_cifar_photo_on_cnn6():
    # The paper's setting: CNN6 (LeakyReLU, no biases), random weights, one CIFAR-sized image,
    # float32 weights and update.  Measured: 72.6 dB, SSIM 1.000, label right; 17 s on a busy,
    # shared 2-core CPU (the Gram matrices of the ~3000-unknown systems dominate).
    truth = _photo()
    view = ServerView.from_local_step(_model(CIFAR), truth, CIFAR)
    reconstruction = _attack(view)
    result = score(reconstruction, truth, CIFAR)
    assert result["psnr"] >= 30
    assert reconstruction.labels.tolist() == [3]
    assert reconstruction.inputs.shape == (1, 3, 32, 32)
    assert reconstruction.inputs.dtype == torch.float32
    assert reconstruction.info["underdetermined"] == 0
    assert reconstruction.info["rank_layer0"] == reconstruction.info["unknowns_layer0"] == 3072


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid", "tanh"])
def test_recovers_digits_with_every_invertible_activation(activation, bias):
    # Measured over seeds 0-2: LeakyReLU 66-98 dB, Tanh 84-100 dB, Sigmoid 38-41 dB (its
    # derivative <= 1/4 shrinks the deep layers' gradients towards float32 rounding); labels
    # always right; under 0.1 s each.
    truth = _digit(1)
    view = ServerView.from_local_step(
        _model(DIGITS, 1, activation=activation, bias=bias), truth, DIGITS
    )
    reconstruction = _attack(view)
    assert score(reconstruction, truth, DIGITS)["psnr"] > 35
    assert reconstruction.labels.tolist() == truth.labels.tolist()
    for layer in range(7):
        assert (
            reconstruction.info[f"rank_layer{layer}"]
            == reconstruction.info[f"unknowns_layer{layer}"]
        )


def _narrow(seed: int = 0) -> nn.Module:
    """Two 3x3 stride-2 filters on an 8x8 image: 50 equations for its 64 pixels."""
    with seeding.isolated(seed, "model"):
        return nn.Sequential(
            nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 10)
        )


def test_rank_analysis_flags_an_underdetermined_layer():
    ranks = rank_analysis(_narrow(), DIGITS.input_shape)
    first, classifier = ranks
    assert (first.unknowns, first.rank, first.determined) == (64, 46, False)
    assert "more output channels (now 2)" in first.advice and "image" in first.advice
    assert classifier.determined and classifier.advice == ""
    assert all(layer.determined for layer in rank_analysis(_model(DIGITS), DIGITS.input_shape))

    truth = _digit(0)
    view = ServerView.from_local_step(_narrow(), truth, DIGITS)
    with pytest.warns(UnderdeterminedWarning, match=r"layer 0 \(0\).*rank 46 for 64 unknowns"):
        reconstruction = ATTACKS["rgap"]()(view, seeding.rng(0))
    info = reconstruction.info
    assert (info["rank_layer0"], info["unknowns_layer0"], info["underdetermined"]) == (46, 64, 1)
    assert reconstruction.labels.tolist() == truth.labels.tolist()  # the classifier is fine


def test_contract():
    attack = ATTACKS["rgap"]()
    assert isinstance(attack, Attack) and attack.modality == "image"
    truth = _digit(0)
    view = ServerView.from_local_step(_model(DIGITS), truth, DIGITS)
    a, b = attack(view, seeding.rng(0)), attack(view, seeding.rng(1))
    assert torch.equal(a.inputs, b.inputs)  # closed form: no randomness
    assert a.labels.dtype == torch.long and a.labels.shape == (1,)
    assert all(isinstance(v, float) for v in a.info.values())
    attack.check(_setting(_model(DIGITS)))
    attack.check(_setting(MODELS["lenet"]()(DIGITS)))  # DLG's sigmoid LeNet is covered too


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: MODELS["convnet"](width=2)(DIGITS), r"norm0 \(BatchNorm2d\) normalises"),
        (lambda: MODELS["lenet"](activation="relu")(DIGITS), r"1 \(ReLU\) is not invertible"),
        (
            lambda: MODELS["resnet18"]()(DIGITS),
            r"stage1.0 \(_Block\) is a block with its own forward \(e.g. a residual connection\)",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten()),
            r"2 \(MaxPool2d\) pools.*strided convolution",
        ),
        (
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Sigmoid()),
            r"classifier 1 must be the last layer",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.LeakyReLU(0.0), nn.Flatten()),
            r"slope 0.0\) is not invertible",
        ),
    ],
)
def test_uncovered_models_are_refused_clearly(model, message):
    with pytest.raises(ValueError, match=message):
        ATTACKS["rgap"]().check(_setting(model()))
    with pytest.raises(ValueError, match=message):
        rank_analysis(model(), DIGITS.input_shape)


def test_uncovered_model_fails_the_same_way_when_attacked_directly():
    truth = _digit(0)
    view = ServerView.from_local_step(MODELS["lenet"](activation="relu")(DIGITS), truth, DIGITS)
    with pytest.raises(ValueError, match=r"rgap: 1 \(ReLU\) is not invertible"):
        ATTACKS["rgap"]()(view, seeding.rng(0))


def test_batches_and_text_are_refused():
    g = seeding.rng(0, "data")
    pair = Batch(torch.rand((2, 1, 8, 8), generator=g), torch.tensor([1, 2]))
    view = ServerView.from_local_step(_model(DIGITS), pair, DIGITS)
    with pytest.raises(ValueError, match=r"B = 1 attack.*reports 2 examples"):
        ATTACKS["rgap"]()(view, seeding.rng(0))
    attack = ATTACKS["rgap"]()
    with pytest.raises(ValueError, match=r"B = 1.*whole partition.*batch_size = 1"):
        attack.check(_setting(_model(DIGITS), batch_size=0))
    with pytest.raises(ValueError, match=r"several local steps.*local_steps = 1"):
        attack.check(_setting(_model(DIGITS), local_steps=2))
    with pytest.raises(ValueError, match=r"modality is 'text'"):
        attack.check(_setting(_model(DIGITS), Task("text", (12,), 2)))


def test_experiment_with_rgap_loads(tiny):
    training = {"name": "sgd", "lr": 0.1, "batch_size": 1}
    exp = config.load(
        tiny(model={"name": "rgap_cnn"}, training=training, attacks=[{"name": "rgap"}])
    )
    exp.check()
    with pytest.raises(ConfigError, match=r"\[attacks.0\] rgap: .*batch_size = 1"):
        config.load(tiny(model={"name": "rgap_cnn"}, attacks=[{"name": "rgap"}])).check()
    with pytest.raises(ConfigError, match=r"\[attacks.0\] rgap: relu0 \(ReLU\) is not invertible"):
        spec = tiny(model={"name": "convnet", "width": 2, "norm": "none"}, training=training)
        config.load({**spec, "attacks": [{"name": "rgap"}]}).check()
