"""Experiment files: every shipped file loads; each kind of mistake gives one clear message."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedleak import config
from fedleak.cli import main
from fedleak.models import MODELS
from fedleak.registry import ConfigError
from fedleak.training import TRAINERS

SIMULATIONS = Path(__file__).resolve().parents[1] / "simulations"
FILES = sorted(SIMULATIONS.glob("*.toml"))  # experiments; benchmarks/ hold their own formats


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_shipped_experiment_loads(path):
    exp = config.load(path, ["data.root=/nonexistent"] if "root" in path.read_text() else [])
    assert exp.federation.name and exp.attacks


def test_extends_merges_tables_and_replaces_arrays():
    base = config.load(SIMULATIONS / "quickstart.toml")
    defended = config.load(SIMULATIONS / "quickstart_defended.toml")
    assert [d.name for d in defended.defenses] == ["clip", "gaussian_noise"]
    assert not base.defenses
    assert defended.resolved["training"] == base.resolved["training"]
    assert defended.federation.name == "quickstart-defended"


def test_overrides_use_dotted_keys_and_toml_values(tiny):
    exp = config.load(
        tiny(defenses=[{"name": "gaussian_noise"}]),
        ["training.lr=0.5", "defenses.0.std=0.2", "rounds=3"],
    )
    assert exp.trainer.lr == 0.5 and exp.defenses[0].std == 0.2 and exp.federation.rounds == 3
    assert config.load(tiny(), ["data.examples=32"]).data.examples == 32


BAD = [
    ({"rounds": 0}, "[experiment] rounds must be >= 1, got 0"),
    ({"rounds": "3"}, "[experiment] rounds must be int, got str '3'"),
    ({"clients_per_round": 9}, "clients_per_round must be in 1..clients=4, got 9"),
    ({"roundz": 2}, "Unknown top-level key 'roundz'. Did you mean 'rounds'?"),
    ({"model": {"name": "lenett"}}, "[model] Unknown model 'lenett'. Did you mean 'lenet'?"),
    (
        {"attacks": [{"name": "dlg", "step": 5}]},
        "[attacks.0] attack 'dlg' has no option 'step'. Did you mean 'steps'?",
    ),
    ({"attacks": [{"name": "dlg", "steps": -1}]}, "[attacks.0] dlg: steps must be >= 1, got -1"),
    ({"attacks": {"name": "dlg"}}, "attacks must be an array of tables: write [[attacks]]"),
    (
        {"training": {"name": "sgd", "lr": "fast"}},
        "[training] trainer 'sgd': lr must be float, got str 'fast'",
    ),
    (
        {"defenses": [{"name": "clip", "max_norm": -1}]},
        "[defenses.0] clip: max_norm must be > 0, got -1",
    ),
    ({"observe": {"rounds": [5]}}, "[observe] rounds [5] are outside 1..rounds=2"),
    ({"data": {"name": "digits", "test_fraction": 2.0}}, "test_fraction"),
    ({"partition": {"name": "dirichlet", "alpha": -1.0}}, "alpha must be > 0"),
    (
        {"model": {"name": "mlp", "activation": "gelu"}},
        "[model] model 'mlp': activation must be one of 'relu', 'sigmoid', 'tanh', got 'gelu'",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_each_mistake_gives_one_clear_message(tiny, change, message):
    with pytest.raises(ConfigError) as err:
        config.load(tiny(**change))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rounds", "must look like dotted.key=value"),
        ("trainin.lr=1", "no table 'trainin'. Did you mean 'training'?"),
        ("attacks.3.steps=1", "attacks has 1 entries (indexed from 0), so '3' does not exist"),
    ],
)
def test_bad_overrides(tiny, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        config.load(tiny(), [override])
    assert message in str(err.value)


@MODELS.register("flat784")
@dataclass
class Flat784:
    """A classifier for 28x28 inputs only (for the mismatch test)."""

    def __call__(self, task):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, task.num_classes))


def test_mismatches_found_by_check(tiny):
    with pytest.raises(ConfigError, match=r"\[partition\].*64"):
        config.load(tiny(partition={"name": "iid", "examples_per_client": 1000})).check()
    with pytest.raises(
        ConfigError, match=r"\[model\] 'flat784' does not fit \[data\] 'synthetic_images'"
    ):
        config.load(tiny(model={"name": "flat784"})).check()


def test_defense_and_model_mismatch_found_by_check(tiny):
    spec = tiny(model={"name": "convnet", "width": 4}, defenses=[{"name": "dpsgd"}])
    with pytest.raises(ConfigError, match=r'\[defenses.0\] dpsgd: .*\[model\] norm = "group"'):
        config.load(spec).check()
    config.load(
        tiny(model={"name": "convnet", "width": 4, "norm": "group"}, defenses=[{"name": "dpsgd"}])
    ).check()


def test_attack_and_data_modality_mismatch(tiny, monkeypatch):
    exp = config.load(tiny())
    monkeypatch.setattr(type(exp.attacks[0]), "modality", "text")
    with pytest.raises(
        ConfigError,
        match=r"\[attacks\] 'dlg' attacks text data, but \[data\] 'synthetic_images' is image data",
    ):
        exp.check()


def test_missing_data_root_is_a_clear_error(tiny, tmp_path):
    exp = config.load(tiny(data={"name": "mnist", "root": str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        exp.check()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "simulations/nope.toml"], "No experiment file at simulations/nope.toml"),
        (
            ["run", str(SIMULATIONS / "quickstart.toml"), "-o", "model.name=lenett"],
            "Did you mean 'lenet'?",
        ),
        (
            ["run", str(SIMULATIONS / "quickstart.toml"), "-o", "runner.name=rey"],
            "Unknown runner 'rey'. Did you mean 'ray'?",
        ),
        (["list", "atacks"], "Unknown kind 'atacks'. Did you mean 'attacks'?"),
    ],
)
def test_cli_prints_one_message_and_no_traceback(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


REQUIRED = {"zo_query": {"parameters": ["head"]}}  # options without a default


@pytest.mark.parametrize(
    "trainer", [n for n in TRAINERS.names() if getattr(TRAINERS[n], "defend_with", None)]
)
@pytest.mark.parametrize("defense", ["dpsgd", "dropout", "per_example_clip"])
def test_trainers_without_sgd_steps_refuse_training_defenses_at_load(tiny, trainer, defense):
    spec = tiny(training={"name": trainer, **REQUIRED.get(trainer, {})})
    spec["defenses"] = [{"name": defense}]
    with pytest.raises(ConfigError, match=f"{defense}.*protect it with"):
        config.load(spec)


@pytest.mark.parametrize(
    "trainer", [n for n in TRAINERS.names() if getattr(TRAINERS[n], "defend_with", None)]
)
def test_their_fit_refuses_training_defenses_handed_to_it_directly(trainer):
    from fedleak.defenses import DEFENSES

    plugin = TRAINERS[trainer](**REQUIRED.get(trainer, {}))
    with pytest.raises(ValueError, match=f"{trainer}: training defenses do not apply"):
        plugin.fit(None, None, None, None, defenses=(DEFENSES["dpsgd"](),))


def test_generated_data_this_machine_cannot_hold_is_refused_before_generating(tiny, monkeypatch):
    monkeypatch.setattr(config, "_memory", lambda: 24 * 2**30)  # a 24 GiB machine
    exp = config.load(tiny(data={"name": "digit_domains", "domains": 10**6}))
    with pytest.raises(ConfigError, match=r"200,000,000 examples.*has 24 GiB; generate fewer"):
        exp.check()
