"""Experiments as TOML files, checked completely before any training starts.

One file describes one experiment: the federation (``rounds``, ``clients``,
``clients_per_round``, ``seed``), its ``[data]``, ``[partition]``, ``[model]`` and
``[training]``, an optional client ``[selection]`` of local examples, the ``[server]`` strategy
(``fedavg`` by default), the clients' ``[[defenses]]``, the server's ``[[modifiers]]``, which
updates to ``[observe]``, the ``[[attacks]]`` to run on them, and the ``[runner]`` that executes
it.
Every table is built through its registry, so unknown names, unknown options, wrong types and
out-of-range values each become one :class:`~fedleak.registry.ConfigError`; cross-component
mismatches (an image attack on text data, observing a round that never happens) too.

A file may start from another with ``extends = "other.toml"`` (a path relative to it): tables
are merged key by key, arrays of tables are replaced whole.

Overrides use dotted keys, the same ones a sweep would use: ``training.lr=0.05``,
``defenses.0.std=0.1`` (arrays of tables are indexed from 0).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch
from torch import nn

from fedleak import seeding
from fedleak.attacks import ATTACKS
from fedleak.core import (
    AggregationDefense,
    Attack,
    Batch,
    Dataset,
    DataSource,
    GradientDefense,
    ModelModifier,
    ModelSpec,
    Partitioner,
    Selector,
    ServerStrategy,
    Setting,
    Task,
    Trainer,
    TrainingDefense,
    UpdateDefense,
    sends,
)
from fedleak.data import DATASETS, PARTITIONS
from fedleak.defenses import DEFENSES
from fedleak.device import resolve as resolve_device
from fedleak.models import MODELS
from fedleak.modifiers import MODIFIERS
from fedleak.registry import ConfigError, Registry, construct, suggest
from fedleak.selection import SELECTORS
from fedleak.server import SERVER_STRATEGIES
from fedleak.training import TRAINERS


@dataclass(frozen=True)
class Federation:
    """The top-level scalars of an experiment file."""

    name: str = "experiment"
    description: str = ""
    seed: int = 0  # every random stream derives from it (seeding.rng)
    rounds: int = 1
    clients: int = 2  # virtual clients (partitions)
    clients_per_round: int = 2  # sampled each round without replacement
    # The run stops as "diverged" when the global test loss exceeds this multiple of its value
    # before round 1 (a NaN/inf model or update always stops it); 0 = only on NaN/inf.
    divergence_ratio: float = 1000.0
    # Where clients train and attacks run: cpu | cuda | cuda:N | mps | auto (fedleak.device).
    device: str = "cpu"

    def __post_init__(self) -> None:
        resolve_device(self.device)  # an unavailable device fails when the file loads
        # The name is a directory under runs/: one path component, so that a run can only go
        # elsewhere through --out.
        if self.name in ("", ".", "..") or any(c in "/\\" or c < " " for c in self.name):
            raise ValueError(
                f"name must be a single directory name (no '/', '\\', '..' or control "
                f"characters), got "
                f"{self.name!r}; choose where the run goes with --out instead"
            )
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.divergence_ratio < 0:
            raise ValueError(
                f"divergence_ratio must be >= 0 (0 = stop only on NaN/inf), got "
                f"{self.divergence_ratio}"
            )
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not 1 <= self.clients_per_round <= self.clients:
            raise ValueError(
                f"clients_per_round must be in 1..clients={self.clients}, "
                f"got {self.clients_per_round}"
            )


@dataclass(frozen=True)
class Observe:
    """Which updates the server records for attacks."""

    rounds: tuple[int, ...] = (1,)  # rounds to record; empty = every round
    clients_per_round: int = 0  # record the first N sampled clients (by index); 0 = all

    def __post_init__(self) -> None:
        if self.clients_per_round < 0:
            raise ValueError(f"clients_per_round must be >= 0, got {self.clients_per_round}")

    def round(self, r: int) -> bool:
        """Whether round ``r`` is observed."""
        return not self.rounds or r in self.rounds


@dataclass(frozen=True)
class Runner:
    """How the federation is executed; the options are checked by fedleak.sim.runners."""

    name: str = "local"
    options: Mapping[str, Any] = field(default_factory=dict)


_TABLES: dict[str, Registry[Any]] = {
    "data": DATASETS,
    "partition": PARTITIONS,
    "model": MODELS,
    "training": TRAINERS,
    "selection": SELECTORS,
    "server": SERVER_STRATEGIES,
}
_ARRAYS: dict[str, Registry[Any]] = {
    "defenses": DEFENSES,
    "modifiers": MODIFIERS,
    "attacks": ATTACKS,
}
_DEFAULTS = {
    "partition": {"name": "iid"},
    "training": {"name": "sgd"},
    "server": {"name": "fedavg"},
}
_OPTIONAL = {"selection"}  # tables an experiment may leave out
_TOP = [f.name for f in dataclasses.fields(Federation)] + [*_TABLES, *_ARRAYS, "observe", "runner"]


@dataclass
class Experiment:
    """A loaded, validated experiment: real plugin objects plus the resolved config."""

    federation: Federation
    data: DataSource
    partition: Partitioner
    model: ModelSpec
    trainer: Trainer
    defenses: tuple[UpdateDefense | TrainingDefense, ...]
    modifiers: tuple[ModelModifier, ...]
    attacks: tuple[Attack, ...]
    observe: Observe
    runner: Runner
    resolved: dict[str, Any]  # every option, defaults included: what config.toml records
    server: ServerStrategy = field(default_factory=lambda: SERVER_STRATEGIES["fedavg"]())
    selection: Selector | None = None  # None: every client trains on its whole partition
    _template: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    loss_fn = staticmethod(nn.functional.cross_entropy)  # classification tasks throughout

    @property
    def seed(self) -> int:
        """The experiment seed."""
        return self.federation.seed

    def toml(self) -> str:
        """The resolved experiment as TOML text (reloads to an identical experiment)."""
        return tomli_w.dumps(self.resolved)

    @property
    def device(self) -> torch.device:
        """The device clients train and attacks run on (``auto`` resolved on this machine)."""
        return resolve_device(self.federation.device)

    @property
    def update_defenses(self) -> tuple[UpdateDefense, ...]:
        """Defenses that transform the update, in config order."""
        return tuple(d for d in self.defenses if stage(d) == "update")

    @property
    def training_defenses(self) -> tuple[TrainingDefense | GradientDefense, ...]:
        """Defenses that change local training (wrap it, or act on each step), in config order."""
        return tuple(d for d in self.defenses if stage(d) == "training")

    @property
    def secure_aggregation(self) -> AggregationDefense | None:
        """The aggregation protocol that hides individual updates, if the clients use one."""
        return next((d for d in self.defenses if stage(d) == "aggregation"), None)

    def dataset(self) -> Dataset:
        """The loaded data set (cached per process: every client of a process shares it).

        The cache keeps the last few data sets, so a long-lived process that loads many
        (a benchmark, the test suite) does not hold them all.
        """
        key = repr(self.data)
        if key not in _DATASET_CACHE:
            while len(_DATASET_CACHE) >= CACHED_DATASETS:
                del _DATASET_CACHE[next(iter(_DATASET_CACHE))]  # the oldest
            try:
                _DATASET_CACHE[key] = self.data.load()
            except MemoryError as err:  # the OS refused the allocation outright
                raise ConfigError(
                    f"[data] {self.data.name!r} does not fit in this machine's memory ({err}); "
                    "choose fewer or smaller examples."
                ) from None
        return _DATASET_CACHE[key]

    def partitions(self) -> list[torch.Tensor]:
        """Each client's example indices into the training pool (deterministic in the seed)."""
        key = (repr(self.data), repr(self.partition), self.federation.clients, self.seed)
        if key not in _PARTITION_CACHE:
            labels = self.dataset().train.labels.numpy()
            parts = self.partition(
                labels, self.federation.clients, seeding.numpy_rng(self.seed, "partition")
            )
            _PARTITION_CACHE[key] = [torch.as_tensor(p, dtype=torch.long) for p in parts]
        return _PARTITION_CACHE[key]

    def client_data(self, client: int) -> Batch:
        """The training examples of one client."""
        return self.dataset().train.select(self.partitions()[client])

    def build_model(self) -> nn.Module:
        """A new copy of the global architecture (modifiers applied) with the seed's weights."""
        if self._template is None:  # built once: clients and attacks ask for it every round
            model = self._bare_model()
            for i, modifier in enumerate(self.modifiers):
                try:
                    model = modifier.architecture(model)
                except ValueError as err:
                    raise ConfigError(f"[modifiers.{i}] {err}") from None
            self._template = model
        return copy.deepcopy(self._template)

    def _bare_model(self) -> nn.Module:
        """The architecture before any modifier, with the seed's weights."""
        with seeding.isolated(self.seed, "model"):
            return self.model(self.dataset().task)

    def plugins(self) -> list[tuple[str, Any]]:
        """Every plugin of the experiment with the config table it came from."""
        return [
            ("data", self.data),
            ("partition", self.partition),
            ("model", self.model),
            ("training", self.trainer),
            *([("selection", self.selection)] if self.selection is not None else []),
            ("server", self.server),
            *((f"defenses.{i}", d) for i, d in enumerate(self.defenses)),
            *((f"modifiers.{i}", m) for i, m in enumerate(self.modifiers)),
            *((f"attacks.{i}", a) for i, a in enumerate(self.attacks)),
        ]

    def _ask_plugins(self, task: Task, modifiers: bool) -> None:
        """Call the ``check(setting)`` of the modifiers, or of every other plugin.

        Modifiers are asked about the bare architecture they will modify, the others about the
        model as sent (see :class:`fedleak.core.Setting`).  A ValueError from a plugin becomes a
        ConfigError naming its table.
        """
        asked = [
            (where, plugin)
            for where, plugin in self.plugins()
            if where.startswith("modifiers.") == modifiers and hasattr(plugin, "check")
        ]
        if not asked:
            return
        model = self._bare_model() if modifiers else self.build_model()
        setting = Setting(
            task,
            model,
            self.trainer,
            self.defenses,
            self.modifiers,
            self.attacks,
            server=self.server,
            selection=self.selection,
        )
        for where, plugin in asked:
            try:
                plugin.check(setting)
            except ValueError as err:
                raise ConfigError(f"[{where}] {err}") from None

    def _check_size(self, task: Task) -> None:
        """Refuse a model this machine cannot hold, before allocating it (e.g. width = 10**6).

        The model is first built on the meta device, which allocates nothing; a run keeps
        about four copies of it in memory (template, global state, a client's model, its
        gradients).
        """
        try:
            with torch.device("meta"), seeding.isolated(self.seed, "model"):
                count = sum(p.numel() for p in self.model(task).parameters())
        except Exception:  # a model that cannot be built on the meta device is not sized
            return
        needed, total = 4 * 4 * count, _memory()
        if total and needed > total:
            raise ConfigError(
                f"[model] {self.model.name!r} has {count:,} parameters: about "
                f"{needed / 2**30:.0f} GiB for a run, and this machine has {total / 2**30:.0f} "
                "GiB; choose a smaller width or depth."
            )

    def check(self) -> None:
        """Checks that need the data: partition feasibility and a forward pass of the model.

        Cheap next to training; the CLI calls it before starting a run.
        """
        examples = getattr(self.data, "generated_examples", 0)
        if examples and (total := _memory()):
            # float32 inputs and their normalised copy, before anything is generated
            size = 2 * 4 * examples * math.prod(self.data.task.input_shape)
            if size > total / 2:
                raise ConfigError(
                    f"[data] {self.data.name!r} would generate {examples:,} examples of shape "
                    f"{self.data.task.input_shape}: about {size / 2**30:.0f} GiB, and this "
                    f"machine has {total / 2**30:.0f} GiB; generate fewer examples."
                )
        try:
            parts = self.partitions()
        except ValueError as err:
            raise ConfigError(f"[partition] {err}") from None
        if empty := [c for c, p in enumerate(parts) if len(p) == 0]:
            raise ConfigError(
                f"[partition] {len(empty)} of {len(parts)} clients get no examples "
                f"(e.g. client {empty[0]}); use fewer clients or a larger data set."
            )
        secure = self.secure_aggregation
        if secure is not None and hasattr(secure, "check_round"):
            try:
                secure.check_round(self.federation.clients_per_round, max(map(len, parts)))
            except ValueError as err:
                raise ConfigError(f"[defenses] {err}") from None
        task = self.dataset().task
        for attack in self.attacks:
            if attack.modality != task.modality:
                raise ConfigError(
                    f"[attacks] {attack.name!r} attacks {attack.modality} data, but "
                    f"[data] {self.data.name!r} is {task.modality} data; pick a "
                    f"{task.modality} attack: {', '.join(_names(ATTACKS, task.modality))}."
                )
        # Models declare the modality they take; those that do not predate text and take images.
        takes = getattr(self.model, "modality", "image")
        if takes != task.modality:
            fitting = [
                n
                for n in MODELS.names()
                if getattr(MODELS[n], "modality", "image") == task.modality
            ]
            raise ConfigError(
                f"[model] {self.model.name!r} takes {takes} data, but [data] {self.data.name!r} "
                f"is {task.modality} data; pick one for {task.modality}: {', '.join(fitting)}."
            )
        self._check_size(task)
        self._ask_plugins(task, modifiers=True)
        model = self.build_model()
        if task.tokenizer and hasattr(model, "vocab_size"):
            from fedleak import hf  # transformers: only text experiments need it

            size = len(hf.tokenizer(task.tokenizer))
            if size > model.vocab_size:
                raise ConfigError(
                    f"[data] the tokenizer in {task.tokenizer} has {size} tokens, but [model] "
                    f"{self.model.name!r} embeds only {model.vocab_size}; tokenise with the "
                    "model's own tokenizer (data.tokenizer) or pick a model with its vocabulary."
                )
        sample = self.client_data(0)
        try:
            logits = model(sample.inputs[:1])
        except (RuntimeError, ValueError, IndexError) as err:
            raise ConfigError(
                f"[model] {self.model.name!r} does not fit [data] {self.data.name!r} "
                f"(inputs {tuple(task.input_shape)}): {err}"
            ) from None
        if logits.shape[-1] != task.num_classes:
            raise ConfigError(
                f"[model] {self.model.name!r} outputs {logits.shape[-1]} classes, "
                f"[data] {self.data.name!r} has {task.num_classes}."
            )
        self._ask_plugins(task, modifiers=False)


def _memory() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


CACHED_DATASETS = 4
_DATASET_CACHE: dict[str, Dataset] = {}
_PARTITION_CACHE: dict[tuple, list[torch.Tensor]] = {}


def stage(defense: Any) -> str:
    """Where a defense acts, from the protocol it implements (see fedleak.core)."""
    if hasattr(defense, "wrap") or hasattr(defense, "gradients"):
        return "training"
    return "aggregation" if hasattr(defense, "aggregate") else "update"


def _names(registry: Registry[Any], modality: str) -> list[str]:
    return [n for n in registry.names() if getattr(registry[n], "modality", None) == modality]


def load(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Experiment:
    """Load an experiment from a TOML path, TOML text or a dict; apply ``key=value`` overrides."""
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif isinstance(source, Path) or ("\n" not in str(source) and str(source).endswith(".toml")):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"No experiment file at {path}; the examples live in simulations/.")
        raw = _read(path, ())
    else:
        raw = _parse(str(source), "<text>")
    for item in overrides:
        _override(raw, item)
    return build(raw)


def _read(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """Parse ``path``, resolving ``extends`` (relative to the file) recursively."""
    raw = _parse(read_text(path), str(path))
    if "extends" not in raw:
        return raw
    base = (path.parent / str(raw.pop("extends"))).resolve()
    if base in chain or base == path.resolve():
        raise ConfigError(f"{path} extends itself through {base}")
    if not base.is_file():
        raise ConfigError(f"{path}: extends = {base.name!r}, but there is no file {base}")
    return _merge(_read(base, (*chain, path.resolve())), raw)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_text(path: Path) -> str:
    """A TOML file's text; a file that is not UTF-8 (binary, another encoding) is a ConfigError."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not a TOML file: byte {err.start} is not UTF-8 text; pass an experiment "
            "file such as simulations/quickstart.toml"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML: {err}") from None


def _override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is TOML, or a bare string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"Override {item!r} must look like dotted.key=value, e.g. training.lr=0.05"
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare strings (paths, names) need no quotes on the command line
    *parents, last = key.split(".")
    node: Any = raw
    for i, part in enumerate(parents):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"Override {key!r}: {'.'.join(parents[:i])} has {len(node)} entries "
                    f"(indexed from 0), so {part!r} does not exist."
                )
            node = node[int(part)]
        else:
            if i == 0 and part not in _TOP:
                raise ConfigError(f"Override {key!r}: no table {part!r}.{suggest(part, _TOP)}")
            node = node.setdefault(part, {})
    if isinstance(node, list):
        raise ConfigError(
            f"Override {key!r}: index the array, e.g. {key.rsplit('.', 1)[0]}.0.{last}"
        )
    node[last] = value


def build(raw: Mapping[str, Any]) -> Experiment:
    """Build and cross-check an experiment from its parsed TOML."""
    if unknown := sorted(set(raw) - set(_TOP)):
        key = unknown[0]
        raise ConfigError(
            f"Unknown top-level key {key!r}.{suggest(key, _TOP)} Known: {', '.join(_TOP)}."
        )
    top = {
        k: v
        for k, v in raw.items()
        if k not in _TABLES and k not in _ARRAYS and k not in ("observe", "runner")
    }
    federation = construct(Federation, top, "experiment")
    tables = {}
    for key, registry in _TABLES.items():
        spec = raw.get(key, _DEFAULTS.get(key))
        if spec is None and key in _OPTIONAL:
            tables[key] = None
            continue
        if spec is None:
            raise ConfigError(
                f"Missing [{key}] table; known {registry.kind}s: {', '.join(registry.names())}."
            )
        tables[key] = registry.build(_table(spec, key), key)
    arrays = {}
    for key, registry in _ARRAYS.items():
        specs = raw.get(key, [])
        if not isinstance(specs, list):
            raise ConfigError(f"{key} must be an array of tables: write [[{key}]], not [{key}].")
        arrays[key] = tuple(
            registry.build(_table(s, key), f"{key}.{i}") for i, s in enumerate(specs)
        )
    observe = construct(Observe, _table(raw.get("observe", {}), "observe"), "observe")
    runner_spec = dict(_table(raw.get("runner", {}), "runner"))
    runner = Runner(runner_spec.pop("name", "local"), runner_spec)
    if bad := [r for r in observe.rounds if not 1 <= r <= federation.rounds]:
        raise ConfigError(f"[observe] rounds {bad} are outside 1..rounds={federation.rounds}.")
    if observe.clients_per_round > federation.clients_per_round:
        raise ConfigError(
            f"[observe] clients_per_round={observe.clients_per_round} exceeds the "
            f"clients_per_round={federation.clients_per_round} sampled each round."
        )
    if sum(stage(d) == "aggregation" for d in arrays["defenses"]) > 1:
        raise ConfigError("[defenses] at most one secure-aggregation protocol per experiment.")
    _check_channels(tables, arrays["defenses"])
    for attack in arrays["attacks"]:
        missing = [
            m
            for m in getattr(attack, "requires", ())
            if m not in {x.name for x in arrays["modifiers"]}
        ]
        if missing:
            raise ConfigError(
                f"[attacks] {attack.name!r} needs the modifier {missing[0]!r}; add a [[modifiers]] "
                f"table with name = {missing[0]!r}."
            )
    resolved = {
        **dataclasses.asdict(federation),
        **{k: _resolved(v) for k, v in tables.items() if v is not None},
        **{k: [_resolved(x) for x in v] for k, v in arrays.items()},
        "observe": dataclasses.asdict(observe),
        "runner": {"name": runner.name, **runner.options},
    }
    return Experiment(
        federation,
        tables["data"],
        tables["partition"],
        tables["model"],
        tables["training"],
        arrays["defenses"],
        arrays["modifiers"],
        arrays["attacks"],
        observe,
        runner,
        resolved,
        server=tables["server"],
        selection=tables["selection"],
    )


def _check_channels(tables: Mapping[str, Any], defenses: Sequence[Any]) -> None:
    """Refuse protocols whose messages the defenses or secure aggregation cannot handle."""
    trainer, selection = tables["training"], tables["selection"]
    if overlap := set(sends(trainer)) & set(sends(selection)):
        raise ConfigError(
            f"[selection] {selection.name!r} and [training] {trainer.name!r} both send "
            f"{sorted(overlap)[0]!r}; the server could not tell them apart."
        )
    wrapping = [d.name for d in defenses if stage(d) == "training"]
    if (instead := getattr(trainer, "defend_with", None)) and wrapping:
        raise ConfigError(
            f"[defenses] {wrapping[0]!r} wraps SGD steps on the task loss, which [training] "
            f"{trainer.name!r} does not take; protect it with {instead}."
        )
    blocked = [d.name for d in defenses if stage(d) in ("update", "aggregation")]
    if not getattr(trainer, "sends_model", True) and blocked:
        raise ConfigError(
            f"[defenses] {blocked[0]!r} acts on the model update, but [training] "
            f"{trainer.name!r} sends no model (only its messages); use the trainer's own "
            "options to protect its messages, or a trainer that sends its model."
        )
    secure = next((d for d in defenses if stage(d) == "aggregation"), None)
    if secure is None:
        return
    talkers = [
        f"[{key}] {p.name!r}"
        for key, p in (("training", trainer), ("selection", selection))
        if sends(p)
    ]
    if tables["server"].name != "fedavg" or talkers:
        what = talkers[0] if talkers else f"[server] {tables['server'].name!r}"
        raise ConfigError(
            f"[defenses] {secure.name!r} sums the clients' states for a FedAvg server; "
            f"{what} needs each client's own messages or states. Drop one of the two."
        )


def _table(spec: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"[{key}] must be a table, got {spec!r}.")
    return spec


def _resolved(plugin: Any) -> dict[str, Any]:
    options = {f.name: getattr(plugin, f.name) for f in dataclasses.fields(plugin) if f.init}
    return {
        "name": plugin.name,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    }
