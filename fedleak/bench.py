"""Privacy–utility sweeps: a grid of defenses × strengths × seeds, each one real federated run.

A sweep file names a base experiment and the grid::

    name = "digits-privacy-utility"          # optional; default: the file's stem
    description = "..."                      # optional
    base = "../../quickstart.toml"           # the experiment every cell starts from (relative
                                             # to this file), or an inline [base] table, which
                                             # may itself say extends = "...".
    seeds = [0, 1]                           # optional; default: the base's seed

    [[defense]]                              # one strength axis per table
    name = "gaussian_noise"                  # a registered defense (fedleak list defenses)
    vary = "std"                             # the option the axis varies
    values = [1e-3, 1e-2, 1e-1]              # weakest first: the strength curve's order
    options = { }                            # optional fixed options of the defense
    label = "gaussian_noise"                 # optional; default: name.  Must be unique, so two
                                             # axes of one defense (e.g. two scopes) need labels

Each cell is the base experiment with ``seed`` set and the axis' defense appended to the
base's own ``[[defenses]]`` (usually none).  The undefended reference of every seed (label
``none``) is implicit and runs first: each defended cell's accuracy drop is measured against
the reference of the same seed.  Every cell runs ``pipeline.run`` (federate, capture, every
configured attack) into ``DIR/cells/<label>-<strength>-s<seed>/``.

Everything is checked before the first cell trains: the sweep's keys, every defense, option
and value (each cell's experiment is built and checked as ``fedleak run`` would), with errors
naming the value and the fix.

Results.  ``DIR/results.csv`` gets one row per cell × attack as soon as the cell is finished
(its columns: :mod:`fedleak.results`, which also loads a sweep as DataFrames); Paper B's bound
comes from :mod:`fedleak.metrics.bound`.  ``fedleak report DIR`` (:mod:`fedleak.report`)
renders tables and the plot from it.

Resuming.  Running the same sweep into the same DIR skips every cell whose rows are in
``results.csv``; a cell whose federation finished but whose attacks did not is resumed; any
other started cell is restarted from scratch.  Attacks appended to the base's list later run
on the finished cells' stored views only.  ``DIR/sweep.toml`` records the sweep, and a
changed base experiment (other than appended attacks) is refused rather than mixed in.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import shutil
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from fedleak import config, results, seeding
from fedleak.config import Experiment
from fedleak.defenses import DEFENSES
from fedleak.registry import ConfigError, suggest
from fedleak.store import RunStore, process_alive

log = logging.getLogger(__name__)  # fedleak.bench: its cell lines are the progress

SWEEP_KEYS = ("name", "description", "base", "seeds", "defense")
AXIS_KEYS = ("name", "vary", "values", "options", "label")
NONE = "none"  # label of the undefended reference cells
_LABEL = re.compile(r"^[A-Za-z0-9_.]+$")  # labels name directories; '-' separates id parts


@dataclass(frozen=True)
class Axis:
    """One ``[[defense]]`` table: a defense whose option ``vary`` takes ``values``."""

    label: str
    name: str
    vary: str
    values: tuple[Any, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One federated run of the grid."""

    label: str  # the axis label, or "none"
    defense: str  # the registered defense, or "none"
    parameter: str  # the option varied ("" for the reference)
    strength: Any  # its value (None for the reference)
    seed: int
    spec: Mapping[str, Any] | None  # the [[defenses]] table appended to the base's

    @property
    def id(self) -> str:
        """The cell's directory name: ``<label>-<strength>-s<seed>`` (``none-s<seed>``)."""
        if self.spec is None:
            return f"{self.label}-s{self.seed}"
        return f"{self.label}-{format_strength(self.strength)}-s{self.seed}"


@dataclass
class Sweep:
    """A loaded, fully checked sweep."""

    name: str
    description: str
    base: dict[str, Any]  # the base experiment, extends resolved and overrides applied
    seeds: tuple[int, ...]
    axes: tuple[Axis, ...]
    experiments: dict[str, Experiment] = field(default_factory=dict)  # by cell id

    def cells(self) -> list[Cell]:
        """Every cell: the references first (one per seed), then axis by axis, value by value."""
        cells = [Cell(NONE, NONE, "", None, s, None) for s in self.seeds]
        for axis in self.axes:
            for value in axis.values:
                spec = {"name": axis.name, **axis.options, axis.vary: value}
                cells += [
                    Cell(axis.label, axis.name, axis.vary, value, s, spec) for s in self.seeds
                ]
        return cells

    def record(self) -> dict[str, Any]:
        """What DIR/sweep.toml holds: the grid and the resolved base experiment."""
        reference = self.experiments[self.cells()[0].id].resolved
        return {
            "name": self.name,
            "description": self.description,
            "seeds": list(self.seeds),
            "defense": [
                {
                    "label": a.label,
                    "name": a.name,
                    "vary": a.vary,
                    "values": list(a.values),
                    "options": dict(a.options),
                }
                for a in self.axes
            ],
            "base": _identity(reference),
        }


def format_strength(value: Any) -> str:
    """A strength as it appears in cell ids and tables: ``0.001``, ``1e-05``, ``8``, ``true``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# -- loading and checking -------------------------------------------------------------------


def load(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Load a sweep file, apply ``key=value`` overrides, and check every cell.

    Overrides of ``seeds``, ``defense.N.*`` and ``base.*`` address the sweep; any other key
    addresses the base experiment, exactly as ``fedleak run -o`` would (``rounds=2``,
    ``attacks.0.steps=3``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"No sweep file at {path}; the committed ones live in "
            "simulations/benchmarks/privacy_utility/."
        )
    raw = _parse(config.read_text(path), str(path))
    sweep_overrides = [o for o in overrides if o.split(".", 1)[0].split("=", 1)[0] in SWEEP_KEYS]
    for item in sweep_overrides:
        if not item.startswith("base."):
            _set(raw, item)
    base = _base(raw, path)
    for item in overrides:
        if item.startswith("base."):
            config._override(base, item.removeprefix("base."))
        elif item not in sweep_overrides:
            config._override(base, item)
    raw["base"] = base
    return build(raw, name=path.stem)


def build(raw: Mapping[str, Any], name: str = "sweep") -> Sweep:
    """Check a parsed sweep (its ``base`` a resolved experiment table) and every cell in it."""
    if unknown := sorted(set(raw) - set(SWEEP_KEYS)):
        key = unknown[0]
        raise ConfigError(
            f"Unknown sweep key {key!r}.{suggest(key, list(SWEEP_KEYS))} "
            f"Known: {', '.join(SWEEP_KEYS)}."
        )
    if not isinstance(raw.get("base"), Mapping):
        raise ConfigError(
            'The sweep needs a base experiment: base = "path/to/experiment.toml" (relative to '
            "the sweep file) or an inline [base] table."
        )
    base = dict(raw["base"])
    try:
        reference = config.build(base)
    except ConfigError as err:
        raise ConfigError(f"[base] {err}") from None
    if not reference.attacks:
        raise ConfigError(
            "[base] has no [[attacks]]: a privacy sweep needs at least one, e.g. "
            'attacks = [{ name = "dlg", steps = 100 }].'
        )
    seeds = raw.get("seeds", [reference.seed])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(
            f"seeds must be a non-empty array of integers, e.g. [0, 1]; got {seeds!r}."
        )
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds} repeat a seed; each seed runs once per cell.")
    axes = _axes(raw.get("defense"))
    sweep_name = raw.get("name", name)
    if not isinstance(sweep_name, str) or not sweep_name:
        raise ConfigError(f"name must be a non-empty string, got {sweep_name!r}.")
    sweep = Sweep(sweep_name, str(raw.get("description", "")), base, tuple(seeds), axes)
    ids: dict[str, Cell] = {}
    for cell in sweep.cells():
        if cell.id in ids:
            raise ConfigError(
                f"[defense] {cell.label}: values {ids[cell.id].strength!r} and {cell.strength!r} "
                f"both name the cell {cell.id!r}; give distinct values."
            )
        ids[cell.id] = cell
        sweep.experiments[cell.id] = _experiment(sweep, cell)
    _check(sweep)
    return sweep


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML: {err}") from None


def _base(raw: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The base experiment as a table: read from its file, or inline with ``extends`` resolved."""
    base = raw.get("base")
    if isinstance(base, str):
        file = (path.parent / base).resolve()
        if not file.is_file():
            raise ConfigError(f"{path}: base = {base!r}, but there is no file {file}.")
        return config._read(file, ())
    if isinstance(base, Mapping):
        table = copy.deepcopy(dict(base))
        if "extends" not in table:
            return table
        file = (path.parent / str(table.pop("extends"))).resolve()
        if not file.is_file():
            raise ConfigError(f"{path}: [base] extends {file.name!r}, but there is no file {file}.")
        return config._merge(config._read(file, ()), table)
    raise ConfigError(
        f"{path}: base must be a path to an experiment file or an inline [base] table, "
        f"got {base!r}."
    )


def _set(raw: dict[str, Any], item: str) -> None:
    """Apply one sweep-level override, e.g. ``seeds=[0]`` or ``defense.0.values=[1]``."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"Override {item!r} must look like dotted.key=value, e.g. seeds=[0]")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *parents, last = key.split(".")
    node: Any = raw
    for part in parents:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"Override {key!r}: there are {len(node)} entries (from 0), no {part!r}."
                )
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        raise ConfigError(f"Override {key!r}: index the array, e.g. defense.0.{last}")
    node[last] = value


def _axes(specs: Any) -> tuple[Axis, ...]:
    if specs is None or specs == []:
        raise ConfigError(
            "The sweep has no [[defense]] tables; add one per strength axis, e.g.\n"
            '[[defense]]\nname = "gaussian_noise"\nvary = "std"\nvalues = [0.001, 0.01, 0.1]'
        )
    if not isinstance(specs, list) or not all(isinstance(s, Mapping) for s in specs):
        raise ConfigError("defense must be an array of tables: write [[defense]], not [defense].")
    axes, labels = [], {}
    for i, spec in enumerate(specs):
        where = f"[defense.{i}]"
        if unknown := sorted(set(spec) - set(AXIS_KEYS)):
            key = unknown[0]
            raise ConfigError(
                f"{where} has no key {key!r}.{suggest(key, list(AXIS_KEYS))} "
                f"It takes: {', '.join(AXIS_KEYS)}."
            )
        name = spec.get("name")
        if name == NONE:
            raise ConfigError(
                f"{where} name = 'none': the undefended reference is part of every sweep "
                "already; remove this table."
            )
        if not isinstance(name, str):
            raise ConfigError(
                f"{where} needs a name; known defenses: {', '.join(DEFENSES.names())}."
            )
        try:
            cls = DEFENSES[name]
        except ConfigError as err:
            raise ConfigError(f"{where} {err}") from None
        options = [f.name for f in fields(cls) if f.init]
        vary = spec.get("vary")
        if not options:
            raise ConfigError(
                f"{where} defense {name!r} has no option to vary; it has no strength."
            )
        if vary not in options:
            raise ConfigError(
                f"{where} vary = {vary!r}: defense {name!r} has no such option."
                f"{suggest(str(vary), options)} It takes: {', '.join(options)}."
            )
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{where} values must be a non-empty array of {name}'s {vary!r}, weakest first."
            )
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where} values {values} repeat a value.")
        fixed = spec.get("options", {})
        if not isinstance(fixed, Mapping):
            raise ConfigError(
                f"{where} options must be a table, e.g. options = {{ scope = 'layer' }}."
            )
        if vary in fixed or "name" in fixed:
            raise ConfigError(
                f"{where} options sets {vary if vary in fixed else 'name'!r}, which the axis sets; "
                "remove it from options."
            )
        for k, value in enumerate(values):
            try:
                DEFENSES.build({"name": name, **fixed, vary: value}, f"defense.{i}")
            except ConfigError as err:
                raise ConfigError(f"{err} (from values[{k}] = {value!r})") from None
        label = spec.get("label", name)
        if not isinstance(label, str) or not _LABEL.match(label) or label == NONE:
            raise ConfigError(
                f"{where} label {label!r} must be letters, digits, '_' or '.', and not 'none'."
            )
        if label in labels:
            raise ConfigError(
                f"{where} label {label!r} is taken by [defense.{labels[label]}]; give one of "
                f'them label = "..." (e.g. "{name}_{i}").'
            )
        labels[label] = i
        axes.append(Axis(label, name, vary, tuple(values), dict(fixed)))
    return tuple(axes)


def _experiment(sweep: Sweep, cell: Cell) -> Experiment:
    raw = copy.deepcopy(sweep.base)
    raw["name"] = cell.id
    raw["seed"] = cell.seed
    if cell.spec is not None:
        raw["defenses"] = [*raw.get("defenses", []), dict(cell.spec)]
    try:
        return config.build(raw)
    except ConfigError as err:
        raise ConfigError(f"cell {cell.id}: {err}") from None


def _check(sweep: Sweep) -> None:
    """The data-dependent checks of every cell (model fits data, Opacus accepts the model, ...)."""
    for cell_id, exp in sweep.experiments.items():
        try:
            exp.check()
        except ConfigError as err:
            raise ConfigError(f"cell {cell_id}: {err}") from None


# -- running ----------------------------------------------------------------------------------


def default_dir(sweep: Sweep, base: str | Path = "runs/bench") -> Path:
    """``runs/bench/<sweep name>``: fixed, so that running the sweep again resumes it."""
    return Path(base) / sweep.name


def run(sweep: Sweep, out: str | Path) -> list[str]:
    """Run every unfinished cell of ``sweep`` into ``out``; return the ids of failed cells.

    A failing cell is logged and recorded (its meta.json says why) and the sweep goes on; the
    defended cells of a seed whose reference failed are skipped, since their drop needs it.
    """
    from fedleak.sim.runners import runner  # checks the runner's options before any training

    store = RunStore(out)
    for exp in sweep.experiments.values():
        runner(exp)
    with _lock(store.root):
        _claim(store, sweep)
        return _run_cells(sweep, store)


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Hold DIR/bench.lock for this process: two sweeps writing one directory corrupt it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bench.lock"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        holder = path.read_text().strip()
        if holder.isdigit() and process_alive(int(holder)):
            raise FileExistsError(
                f"{root} is being written by another fedleak bench (process {holder}); wait for "
                "it, or stop it first."
            ) from None
        path.unlink(missing_ok=True)  # left by a process that died: take it over
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _run_cells(sweep: Sweep, store: RunStore) -> list[str]:
    finished = _finished(store)
    cells = sweep.cells()
    references: dict[int, float] = {}
    failed: list[str] = []
    started, ran = time.monotonic(), 0
    for index, cell in enumerate(cells, 1):
        exp = sweep.experiments[cell.id]
        cell_store = RunStore(store.root / "cells" / cell.id)
        progress = f"[{index}/{len(cells)}] {cell.id}"
        if cell.spec is not None and cell.seed not in references:
            log.warning("%s: skipped, the reference none-s%d has no result", progress, cell.seed)
            failed.append(cell.id)
            continue
        if finished.get(cell.id, 0) == len(exp.attacks):
            if cell.spec is None:
                references[cell.seed] = _reference_accuracy(store, cell.id)
            log.info("%s: finished earlier, skipped", progress)
            continue
        try:
            how = _ensure(exp, cell_store)
        except Exception as err:  # one failed cell must not end the sweep
            log.error("%s: failed: %s: %s", progress, type(err).__name__, err)
            failed.append(cell.id)
            continue
        rows = cell_rows(cell, exp, cell_store, references.get(cell.seed))
        if cell.spec is None:
            references[cell.seed] = float(rows[0]["test_accuracy"])
        _write_rows(store, cell.id, rows, replace=cell.id in finished)
        if how == "ran":
            ran += 1
        best = rows[0]
        eta = ""
        if ran:
            left = sum(1 for c in cells[index:] if c.id not in finished)
            eta = f", about {(time.monotonic() - started) / ran * left / 60:.0f} min left"
        log.info(
            "%s: %s, test accuracy %.4f, drop %s, strongest attack %s PSNR %.2f dB%s",
            progress,
            how,
            float(best["test_accuracy"]),
            best["accuracy_drop"] if best["accuracy_drop"] != "" else "-",
            best["strongest_attack"],
            float(best["max_psnr"]),
            eta,
        )
    return failed


def _claim(store: RunStore, sweep: Sweep) -> None:
    """Write DIR/sweep.toml, or check that DIR holds this sweep (base unchanged)."""
    record = _normalised(sweep.record())
    path = store.root / "sweep.toml"
    if path.exists():
        stored = tomllib.loads(path.read_text())
        _compatible(stored, record, store.root)
    elif store.root.exists() and any(p.name != "bench.lock" for p in store.root.iterdir()):
        raise FileExistsError(
            f"{store.root} is not empty and holds no sweep.toml; choose another --out directory"
        )
    store.write_text("sweep.toml", tomli_w.dumps(record))


def _normalised(record: dict[str, Any]) -> dict[str, Any]:
    """Through TOML and back, so that a new record compares equal to a stored one."""
    return tomllib.loads(tomli_w.dumps(record))


def _identity(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved experiment without what varies between a sweep's cells and machines.

    The device is where the cells run, not which experiment they are: a sweep may be resumed
    on another machine's device.
    """
    return {k: v for k, v in resolved.items() if k not in ("name", "seed", "device")}


def _resolved_now(base: Mapping[str, Any]) -> dict[str, Any]:
    """A stored base as this version resolves it, so a sweep made before a table existed resumes.

    Tables added since then read their defaults (e.g. ``[server]`` = fedavg).
    """
    try:
        return _normalised(_identity(config.build(copy.deepcopy(dict(base))).resolved))
    except ConfigError:  # a base this version cannot build: compared as stored, key by key
        return dict(base)


def _compatible(stored: Mapping[str, Any], new: Mapping[str, Any], root: Path) -> None:
    fix = f"run it into another --out directory, or restore the sweep that made {root}"
    old_base, new_base = _resolved_now(stored.get("base", {})), dict(new["base"])
    old_attacks, new_attacks = old_base.pop("attacks", []), new_base.pop("attacks", [])
    for key in sorted(set(old_base) | set(new_base)):
        if old_base.get(key) != new_base.get(key):
            raise ConfigError(
                f"{root} holds a sweep whose base experiment differs in {key!r} "
                f"({old_base.get(key)!r} there, {new_base.get(key)!r} now); {fix}."
            )
    if new_attacks[: len(old_attacks)] != old_attacks:
        raise ConfigError(
            f"{root} holds a sweep attacked with {old_attacks}; attacks may only be appended "
            f"to that list (now {new_attacks}); {fix}."
        )
    old_axes = {a["label"]: a for a in stored.get("defense", [])}
    for axis in new["defense"]:
        old = old_axes.get(axis["label"])
        if old and (old["name"], old["vary"], old["options"]) != (
            axis["name"],
            axis["vary"],
            axis["options"],
        ):
            raise ConfigError(
                f"{root} holds an axis {axis['label']!r} of {old['name']} varying {old['vary']!r} "
                f"with options {old['options']}; this sweep's differs. Give the new axis another "
                f"label, or {fix}."
            )


def _finished(store: RunStore) -> dict[str, int]:
    """Cell id -> number of attack rows it has in results.csv."""
    if not (store.root / "results.csv").is_file():
        return {}
    return results.read(store.root / "results.csv").groupby("cell").size().to_dict()


def _reference_accuracy(store: RunStore, cell_id: str) -> float:
    rows = results.read(store.root / "results.csv")
    return float(rows.loc[rows["cell"] == cell_id, "test_accuracy"].iloc[0])


def _ensure(exp: Experiment, store: RunStore) -> str:
    """Bring one cell to done: ``"ran"``, ``"resumed"`` (attacks only) or ``"attacked"``."""
    from fedleak import pipeline

    meta = store.meta()
    rounds = exp.federation.rounds
    utility = store.rows("utility.csv")  # one row per round, round 0 (the initial model) too
    federated = (
        meta.get("server") == "done" and bool(utility) and int(utility[-1]["round"]) == rounds
    )
    if meta.get("status") == "done" or federated:
        # The federation is complete: attacks missing (interrupted, or appended to the list)
        # run on the stored views; finished (round, client, attack) rows are kept.
        store.write_text("config.toml", exp.toml())
        pipeline.resume(exp, store)
        return "attacked" if meta.get("status") == "done" else "resumed"
    if store.root.exists():  # interrupted during federation: nothing worth keeping
        log.info("%s: restarting an interrupted cell", store.root.name)
        shutil.rmtree(store.root)
    pipeline.run(exp, store.root)
    return "ran"


# -- rows -------------------------------------------------------------------------------------

# The image metrics averaged over the attacked views, per attack.
METRICS = ("mse", "psnr", "ssim", "label_acc")


def cell_rows(
    cell: Cell, exp: Experiment, store: RunStore, reference: float | None
) -> list[dict[str, Any]]:
    """One row per attack of a finished cell: utility, privacy, its bound and ε."""
    accuracy = float(results.read(store.root / "utility.csv")["test_accuracy"].iloc[-1])
    scores = results.read(store.root / "results.csv").reindex(columns=["attack_index", *METRICS])
    grouped = scores.groupby("attack_index")
    # NaN-skipping means over the attacked views, one row per configured attack in order
    means = grouped.agg(results.mean).reindex(range(len(exp.attacks)))
    views = grouped.size()
    for index, attack in enumerate(exp.attacks):
        if index not in views:
            raise RuntimeError(f"{store.root}: attack {index} ({attack.name}) has no results")
    bound = _bound(exp, store)
    meta = store.meta()
    epsilon = meta.get("dpsgd", {}).get("epsilon", "")
    # the strongest attack: the highest mean PSNR, the first on ties; NaN never wins
    strongest = exp.attacks[int(means["psnr"].fillna(-math.inf).idxmax())].name
    best = {f"max_{k}": round(float(means[k].max()), 6) for k in ("psnr", "ssim", "label_acc")}
    return [
        {
            "cell": cell.id,
            "defense": cell.label,
            "parameter": cell.parameter,
            "strength": "" if cell.strength is None else cell.strength,
            "seed": cell.seed,
            "attack_index": index,
            "attack": attack.name,
            "views": int(views[index]),
            "test_accuracy": accuracy,
            "reference_accuracy": accuracy if reference is None else reference,
            "accuracy_drop": 0.0 if reference is None else round(reference - accuracy, 6),
            **{k: round(float(v), 6) for k, v in means.loc[index].items()},
            "mse_lower_bound": "" if bound is None else round(bound, 6),
            **best,
            "strongest_attack": strongest,
            "epsilon": epsilon,
            "cell_seconds": meta.get("seconds", ""),
        }
        for index, attack in enumerate(exp.attacks)
    ]


def _bound(exp: Experiment, store: RunStore) -> float | None:
    """Mean over views of Paper B's MSE bound, for noise-defended cells (cached in bound.csv)."""
    from fedleak.metrics import bound

    views = store.observed()
    if not views:
        return None
    rows = store.rows("bound.csv")
    if len(rows) < len(views):
        first = next(store.views(exp))
        if bound.not_applicable(first, exp.defenses):
            return None
        pool = exp.dataset()
        prior = bound.pixel_variance(pool.train.inputs, pool.task)
        done = {(r["round"], r["client"]) for r in rows}
        for view in store.views(exp):
            if (str(view.round), str(view.client)) in done:
                continue
            result = bound.mse_lower_bound(
                view,
                store.truth(view.round, view.client),
                exp.defenses,
                prior_var=prior,
                rng=seeding.rng(exp.seed, "bound", view.round, view.client),
            )
            store.append_row(
                "bound.csv",
                {
                    "round": view.round,
                    "client": view.client,
                    "mse_lower_bound": result.mse,
                    "fisher_per_pixel": result.fisher,
                    "prior_var": result.prior_var,
                    "reason": result.reason,
                },
            )
    return float(results.read(store.root / "bound.csv")["mse_lower_bound"].agg(results.mean))


def _write_rows(store: RunStore, cell_id: str, rows: list[dict[str, Any]], replace: bool) -> None:
    """Append a cell's rows to results.csv; first drop its old rows when it was re-attacked."""
    if replace:
        kept = results.read(store.root / "results.csv").query("cell != @cell_id")
        # in csv's own line ending, since RunStore.append_row adds the next rows with csv
        store.write_text("results.csv", kept.to_csv(index=False, lineterminator="\r\n"))
    for row in rows:
        store.append_row("results.csv", row)
