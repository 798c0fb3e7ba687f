import pytest
import torch

from fedleak import seeding
from fedleak.core import Task
from fedleak.models import MODELS
from fedleak.registry import ConfigError

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
SPECS = [
    {"name": "mlp"},
    {"name": "mlp", "hidden": [32, 16], "activation": "tanh"},
    {"name": "lenet"},
    {"name": "lenet", "activation": "relu", "init": "pytorch"},
    {"name": "convnet"},
    {"name": "convnet", "width": 8, "norm": "group"},
    {"name": "convnet", "width": 8, "norm": "none"},
    {"name": "resnet18", "width": 8},
    {"name": "resnet18", "width": 8, "norm": "group"},
]


def task(shape, classes=7):
    return Task("image", shape, classes, mean=(0.5,) * shape[0], std=(0.25,) * shape[0])


def build(spec, shape, seed=0):
    with seeding.isolated(seed, "model"):
        return MODELS.build(spec)(task(shape))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_models_give_logits_for_every_input_size(spec, shape):
    model = build(spec, shape)
    model.train()  # batch norm in training mode needs more than one value per channel
    assert model(torch.randn(3, *shape)).shape == (3, 7)
    model.eval()
    assert model(torch.randn(1, *shape)).shape == (1, 7)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_builds_are_reproducible_and_leave_the_global_rng_alone(spec):
    before = torch.get_rng_state()
    a, b = build(spec, (1, 8, 8)), build(spec, (1, 8, 8))
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = build(spec, (1, 8, 8), seed=1).state_dict()
    assert not all(torch.equal(sa[k], other[k]) for k in sa)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_state_dict_layout_depends_on_options_and_task_only(spec):
    a = build(spec, (3, 32, 32)).state_dict()
    b = MODELS.build(spec)(task((3, 32, 32))).state_dict()  # any RNG state
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_convnet_matches_the_original_at_cifar_size():
    model = build({"name": "convnet", "width": 32}, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64, 128, 128, 128, 128, 128]
    assert model.linear.in_features == 36 * 32
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 2


@torch.no_grad()
def test_kaiming_init_keeps_the_convnets_signal_through_depth():
    # Measured at width 16 with eval-mode batch norm (fresh buffers: identity): the last ReLU's
    # output std is ~0.016 with PyTorch's default init, ~1.25 with Kaiming fan-in.
    x = torch.randn(8, 3, 32, 32, generator=seeding.rng(0, "x"))
    stds = {}
    for init in ("default", "kaiming"):
        model = build({"name": "convnet", "width": 16, "init": init}, (3, 32, 32)).eval()
        stds[init] = float(model[: list(dict(model.named_children())).index("relu7") + 1](x).std())
    assert stds["default"] < 0.05 and stds["kaiming"] > 0.5
    biases = [
        m.bias
        for m in build({"name": "convnet", "init": "kaiming"}, (3, 32, 32)).modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    assert all(float(b.abs().max()) == 0 for b in biases)


def test_lenet_is_dlgs():
    model = build({"name": "lenet"}, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert model[-1].in_features == 768
    assert any(isinstance(m, torch.nn.Sigmoid) for m in model.modules())
    weights = torch.cat([p.flatten() for p in model.parameters()])
    assert weights.abs().max() <= 0.5 and weights.abs().max() > 0.45  # U(-0.5, 0.5)


@pytest.mark.slow  # 11M parameters: 1.5-3.5 s on a 2-core CPU
def test_full_width_resnet18_is_resnet18():
    model = build({"name": "resnet18"}, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    convs = [c for c in convs if c.kernel_size == (3, 3)]  # not the 1x1 shortcuts
    assert len(convs) == 17 and model.fc.in_features == 512  # + fc = 18
    assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000
    assert model.stem.stride == (1, 1)  # the CIFAR stem
    for size in (32, 8):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "mlp", "activation": "gelu"}, "must be one of 'relu', 'sigmoid', 'tanh'"),
        ({"name": "mlp", "hidden": [0]}, "mlp: hidden widths must be >= 1"),
        ({"name": "convnet", "width": 0}, "convnet: width must be >= 1, got 0"),
        ({"name": "resnet18", "norm": "layer"}, "must be one of 'batch', 'group', 'none'"),
    ],
)
def test_bad_options_raise(spec, message):
    with pytest.raises(ConfigError, match=message):
        MODELS.build(spec)


def test_models_built_in_code_check_their_options_too():
    with pytest.raises(ValueError, match="lenet: activation must be one of"):
        MODELS["lenet"](activation="tanh")


def test_conv_models_need_images():
    with pytest.raises(ValueError, match=r"convnet: needs image inputs \(C, H, W\)"):
        MODELS.build({"name": "convnet"})(Task("text", (16,), 2))
