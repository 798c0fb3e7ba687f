from dataclasses import dataclass
from typing import Literal

import pytest

from fedleak.registry import ConfigError, Registry


def make():
    reg = Registry("widget")

    @reg.register("sprocket")
    @dataclass
    class Sprocket:
        """A test widget."""

        teeth: int = 8
        ratio: float = 1.0
        kind: Literal["spur", "helical"] = "spur"
        sizes: tuple[int, ...] = ()

        def __post_init__(self):
            if self.teeth < 1:
                raise ValueError(f"sprocket: teeth must be >= 1, got {self.teeth}")

    return reg, Sprocket


def test_build_checks_and_converts():
    reg, cls = make()
    w = reg.build({"name": "sprocket", "teeth": 3, "ratio": 2, "sizes": [1, 2]})
    assert (
        isinstance(w, cls) and w.ratio == 2.0 and isinstance(w.ratio, float) and w.sizes == (1, 2)
    )
    assert w.name == "sprocket"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"name": "sprokcet"},
            "Unknown widget 'sprokcet'. Did you mean 'sprocket'? Known: sprocket.",
        ),
        ({"teeth": 1}, "needs a 'name'"),
        ({"name": "sprocket", "teth": 1}, "has no option 'teth'. Did you mean 'teeth'?"),
        ({"name": "sprocket", "teeth": "8"}, "teeth must be int, got str '8'"),
        ({"name": "sprocket", "teeth": True}, "teeth must be int, got bool"),
        ({"name": "sprocket", "teeth": 0}, "teeth must be >= 1, got 0"),
        ({"name": "sprocket", "kind": "helix"}, "must be one of 'spur', 'helical', got 'helix'"),
        ({"name": "sprocket", "sizes": [1, "a"]}, "sizes[1] must be int"),
    ],
)
def test_bad_specs_give_one_clear_error(spec, message):
    reg, _ = make()
    with pytest.raises(ConfigError) as err:
        reg.build(spec, "widgets.0")
    assert message in str(err.value)
    assert str(err.value).startswith("[widgets.0]")


def test_duplicate_registration_is_refused():
    reg, _ = make()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("sprocket")(type("Other", (), {}))


def test_every_plugin_kind_is_registered_from_its_files():
    from fedleak.attacks import ATTACKS
    from fedleak.data import DATASETS, PARTITIONS
    from fedleak.defenses import DEFENSES
    from fedleak.models import MODELS
    from fedleak.modifiers import MODIFIERS
    from fedleak.training import TRAINERS

    assert "dlg" in ATTACKS and {"clip", "gaussian_noise"} <= set(DEFENSES.names())
    assert {"digits", "mnist", "cifar10", "synthetic_images"} <= set(DATASETS.names())
    assert {"iid", "dirichlet", "by_class"} <= set(PARTITIONS.names())
    assert {"mlp", "lenet", "convnet", "resnet18"} <= set(MODELS.names())
    assert "sgd" in TRAINERS and "prune_global" in MODIFIERS
    for reg in (ATTACKS, DEFENSES, DATASETS, PARTITIONS, MODELS, MODIFIERS, TRAINERS):
        for name in reg.names():
            assert reg.summary(name), f"{reg.kind} {name} needs a docstring"
