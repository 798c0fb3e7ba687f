"""Bad input never crashes or corrupts a run: each is one clear line, before any training.

The regression cases are the inputs a new user tried that gave a traceback or were accepted
silently; the fuzz test generates malformed configs from the registries' own option types.
"""

from __future__ import annotations

import pytest

from fedleak import cli

QUICK = "simulations/quickstart.toml"


def fails_cleanly(argv, capsys) -> str:
    """Run the CLI; assert exit code 2 and one ``fedleak: error:`` line; return that line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("fedleak: error: "), err
    return lines[0]


def test_a_binary_file_is_not_toml(tmp_path, capsys):
    path = tmp_path / "binary.toml"
    path.write_bytes(bytes(range(256)))
    line = fails_cleanly(["run", str(path)], capsys)
    assert "is not a TOML file" in line and "UTF-8" in line


def test_a_file_in_another_encoding_is_refused(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert "not UTF-8" in fails_cleanly(["run", str(path)], capsys)


def test_pooler_modifier_on_an_image_model(capsys):
    line = fails_cleanly(["run", QUICK, "-o", 'modifiers=[{name="pooler"}]'], capsys)
    assert line.startswith("fedleak: error: [modifiers.0] pooler:")
    assert "'bert' or 'tiny_bert'" in line


def test_tensor_features_without_a_two_layer_head(capsys, tmp_path):
    argv = [
        "run",
        QUICK,
        "-o",
        'attacks=[{name="feature_reconstruction", features="tensor", steps=1}]',
        "--out",
        str(tmp_path / "run"),
    ]
    line = fails_cleanly(argv, capsys)
    assert "[attacks.0]" in line and "gaussian_head" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused(value, capsys):
    line = fails_cleanly(["run", QUICK, "-o", f"training.lr={value}"], capsys)
    assert "lr must be a finite number" in line


@pytest.mark.parametrize("name", ["../../somewhere/else", "a/b", "..", "", "a\\b", "tab\there"])
def test_a_run_name_is_one_path_component(name, capsys):
    line = fails_cleanly(["run", QUICK, "-o", f'name="{name}"'], capsys)
    assert "single directory name" in line and "--out" in line
