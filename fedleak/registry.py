"""Name -> plugin registries, built from what is registered.

Each plugin folder owns one :class:`Registry` and calls :func:`autoload` last in its
``__init__``, so adding a file is enough to register a plugin.  Every error message that lists
choices is built from the registry itself, never from a hand-written list.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import pkgutil
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config names something that does not exist, or gives it a bad option."""


def suggest(name: str, known: list[str]) -> str:
    """' Did you mean X?' for the closest known name, or ''."""
    near = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean {near[0]!r}?" if near else ""


class Registry(Generic[T]):
    """A dict of named plugin classes, filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@ATTACKS.register("dlg")``."""

        def add(cls: type[T]) -> type[T]:
            if name in self._classes:
                owner = self._classes[name].__module__
                raise ValueError(f"{self.kind} {name!r} is already registered by {owner}")
            cls.name = name  # type: ignore[attr-defined]  # so an instance knows its name
            self._classes[name] = cls
            return cls

        return add

    def __getitem__(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}.{suggest(name, self.names())} "
                f"Known: {', '.join(self.names())}."
            )
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def summary(self, name: str) -> str:
        """First line of a plugin's docstring."""
        return (self[name].__doc__ or "").strip().splitlines()[0]

    def build(self, spec: Mapping[str, Any], where: str | None = None) -> T:
        """One config table (``{"name": ..., **options}``) -> one plugin object.

        Unknown options, wrong types and out-of-range values (the plugin's ``__post_init__``)
        all become one :class:`ConfigError` that names the table ``where`` it came from.
        """
        where = where or self.kind
        if "name" not in spec:
            raise ConfigError(
                f"[{where}] needs a 'name'; known {self.kind}s: {', '.join(self.names())}."
            )
        options = dict(spec)
        name = options.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"[{where}] name must be a string, got {name!r}.")
        try:
            cls = self[name]
        except ConfigError as err:
            raise ConfigError(f"[{where}] {err}") from None
        return construct(cls, options, where, label=f"{self.kind} {name!r}")


def construct(cls: type[T], options: Mapping[str, Any], where: str, label: str = "") -> T:
    """Build dataclass ``cls`` from config ``options``, as one clear :class:`ConfigError` if bad.

    Unknown keys, wrong types and values rejected by ``__post_init__`` all name the table
    ``where`` they came from.
    """
    option_of = f"[{where}] {label}: " if label else f"[{where}] "  # names the plugin too
    label = label or f"[{where}]"
    fields = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(
                f"[{where}] {label} has no option {key!r}.{suggest(key, sorted(fields))} "
                f"It takes: {', '.join(sorted(fields)) or 'nothing'}."
            )
        checked[key] = check_type(value, hints[key], f"{option_of}{key}")
    try:
        return cls(**checked)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"[{where}] {err}") from None


def check_type(value: Any, hint: Any, label: str) -> Any:
    """Check a TOML value against a dataclass field's annotation; return it (lists -> tuples).

    Covers what plugin options use: bool, int, float (ints accepted), str, Literal, X | None,
    and tuple[X, ...] (given as a TOML array).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        hint_text = suggest(str(value), [str(a) for a in args])
        raise ConfigError(f"{label} must be one of {choices}, got {value!r}.{hint_text}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return value
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_type(value, arg, label)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{label} must be an array, got {value!r}.")
        item = args[0] if args else Any
        return tuple(check_type(v, item, f"{label}[{i}]") for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(
            f"{label} must be {getattr(hint, '__name__', hint)}, "
            f"got {type(value).__name__} {value!r}."
        )
    if isinstance(value, float) and not math.isfinite(value):
        # TOML has inf and nan literals; no option means either (lr = inf trains a NaN model).
        raise ConfigError(f"{label} must be a finite number, got {value!r}.")
    return value


def autoload(package: str) -> None:
    """Import every module of ``package`` whose name does not start with '_'.

    Call it last in a plugin package's ``__init__``: the imports run the modules'
    ``@REGISTRY.register`` decorators.
    """
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
