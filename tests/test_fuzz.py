"""Fuzzing the config: malformed experiments, generated from the registries' own option types.

Every generated case is certainly wrong (a value its option's type rejects, a non-finite
number, an unknown plugin or option, a plugin on data of the other modality, a broken file),
and must end as ``fedleak run`` exit code 2 with one ``fedleak: error:`` line and no
traceback.  Out-of-range values cannot be known wrong from a type, so for them the property is
weaker: loading and checking either accepts the experiment or refuses it with a ConfigError,
never another exception.  The slow test runs accepted extreme-but-finite settings and checks
that none trains a non-finite model without saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedleak import cli, config
from fedleak.registry import ConfigError, check_type
from fedleak.sim.runners import RUNNERS

BASE = "simulations/quickstart.toml"
# The quickstart cut to a few seconds, in case a case is (wrongly) accepted and trains.
TINY = ["-o", "rounds=1", "-o", "clients=4", "-o", "clients_per_round=2"]
TINY += ["-o", "observe.clients_per_round=1", "-o", 'attacks=[{name="dlg", steps=1}]']

# Candidate TOML values: for each option, those its type annotation rejects are the cases.
CANDIDATES = ('"?bad?"', "true", "1.5", "-7", "{ a = 1 }", "[{ a = 1 }]", "inf", "-inf", "nan")
# Out-of-range candidates: right type, possibly outside what the plugin accepts.
EXTREMES = ("0", "-1", "1e9", "-1e9", "1e-12", "2", "1000000")

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis folder in the work tree
    derandomize=True,  # the same cases on every CI run
    suppress_health_check=[HealthCheck.too_slow],
)


def _options(cls) -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _value(text: str):
    return tomllib.loads(f"v = {text}")["v"]


def _rejects(hint, text: str) -> bool:
    try:
        check_type(_value(text), hint, "x")
    except ConfigError:
        return True
    return False


def _tables():
    """(override prefix, plugin name, plugin class): every plugin of every kind."""
    kinds = {**config._TABLES, **config._ARRAYS, "runner": RUNNERS}
    for key, registry in kinds.items():
        for name in registry.names():
            yield key, name, registry[name]


def _override(key: str, name: str, options: str) -> str:
    """One override that puts plugin ``name`` with ``options`` in table or array ``key``."""
    table = f'{{ name = "{name}"{", " + options if options else ""} }}'
    return f"{key}=[{table}]" if key in config._ARRAYS else f"{key}={table}"


def _typed_cases(candidates, keep):
    """(overrides, the option named) for every option and candidate value ``keep`` selects."""
    cases = []
    for key, name, cls in _tables():
        for option, hint in _options(cls):
            cases += [
                ([_override(key, name, f"{option} = {text}")], option)
                for text in candidates
                if keep(hint, text)
            ]
    for prefix, cls in (("", config.Federation), ("observe.", config.Observe)):
        for option, hint in _options(cls):
            cases += [
                ([f"{prefix}{option}={text}"], option) for text in candidates if keep(hint, text)
            ]
    return cases


WRONG = _typed_cases(CANDIDATES, _rejects)
EXTREME = _typed_cases(EXTREMES, lambda hint, text: not _rejects(hint, text))


def _mismatches():
    """Plugins that declare a modality, put on data of the other one."""
    data = {"image": "digits", "text": "demo_text"}
    other = {"image": "text", "text": "image"}
    cases = []
    for key, name, cls in _tables():
        modality = getattr(cls, "modality", None)
        if key in ("attacks", "model") and modality in data:
            # An attack that needs a modifier says so first: either error is the right one.
            said = "" if getattr(cls, "requires", ()) else f"{modality} data"
            cases.append(
                ([_override("data", data[other[modality]], ""), _override(key, name, "")], said)
            )
    cases.append(([_override("modifiers", "pooler", "")], "pooler"))  # pooler on LeNet
    return cases


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, err.getvalue()


def assert_one_clean_error(code: int, err: str, names: str = "") -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("fedleak: error: "), err
    if names:
        assert names in lines[0], (names, lines[0])


def test_the_generated_cases_cover_every_kind_and_number():
    assert len(WRONG) >= 300 and len(EXTREME) >= 100
    kinds = {re.split(r"[=.]", o[0])[0] for o, _ in WRONG}
    assert {"data", "partition", "model", "training", "defenses", "modifiers"} <= kinds
    assert {"attacks", "runner", "observe", "rounds", "seed"} <= kinds
    assert any("= inf" in o[0] or "=nan" in o[0] for o, _ in WRONG)


def _unknown_name(draw_name: str) -> list[str]:
    return [_override("defenses", draw_name, "")]


broken_files = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 400).map(lambda n: Path(BASE).read_bytes()[:n] + b"\n[[[ broken"),
)


@SETTINGS
@given(
    case=st.one_of(
        st.sampled_from(WRONG),
        st.sampled_from(_mismatches()),
        st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True)
        .filter(lambda n: n not in config._ARRAYS["defenses"])
        .map(lambda n: (_unknown_name(n), "Unknown defense")),
        st.tuples(
            st.sampled_from(list(_tables())),
            st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True),
        )
        .filter(lambda t: t[1] not in {f.name for f in dataclasses.fields(t[0][2])})
        .map(lambda t: ([_override(t[0][0], t[0][1], f"{t[1]} = 1")], "has no option")),
        broken_files.map(lambda data: (data, "")),
    )
)
def test_malformed_experiments_are_one_clean_error(case, tmp_path_factory):
    overrides, names = case
    if isinstance(overrides, bytes):  # a broken file
        path = tmp_path_factory.mktemp("fuzz") / "broken.toml"
        path.write_bytes(overrides)
        argv = ["run", str(path)]
    else:
        argv = ["run", BASE, *TINY, *[x for o in overrides for x in ("-o", o)]]
    out = tmp_path_factory.mktemp("run") / "run"
    code, err = run_cli([*argv, "--out", str(out)])
    assert_one_clean_error(code, err, names)
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


@SETTINGS
@given(case=st.sampled_from(EXTREME))
def test_out_of_range_values_are_accepted_or_a_config_error(case):
    overrides, _ = case
    try:
        exp = config.load(BASE, [*TINY[1::2], *overrides])
        exp.check()
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)  # the CLI prints it as one line


@pytest.mark.slow
@settings(max_examples=12, deadline=None, database=None, derandomize=True)
@given(
    lr=st.floats(1e-3, 1e8),
    defense=st.sampled_from(
        [
            "[]",
            '[{ name = "gaussian_noise", std = 1e6 }]',
            '[{ name = "laplacian_noise", scale = 1e30 }]',
            '[{ name = "clip", max_norm = 1e-30 }]',
            '[{ name = "quantization", bits = 1 }]',
            '[{ name = "gradient_pruning", amount = 0.999999 }]',
        ]
    ),
)
def test_no_accepted_config_trains_a_non_finite_model_silently(lr, defense, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    argv = ["run", BASE, *TINY, "-o", "rounds=2", "-o", f"training.lr={lr!r}"]
    code, err = run_cli([*argv, "-o", f"defenses={defense}", "--out", str(out)])
    assert "Traceback" not in err, err
    if code == 2:
        assert_one_clean_error(code, err)
        return
    if code == 1:
        assert "fedleak: diverged:" in err
        return
    assert code == 0, err
    with open(out / "utility.csv") as f:
        losses = [float(line.split(",")[1]) for line in list(f)[1:]]
    assert all(math.isfinite(loss) for loss in losses)
