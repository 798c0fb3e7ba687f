"""Device support: a lint that no tensor is created off the run's device, and CPU runs with it.

There is no GPU on the machines the tests run on, so correctness on cuda and mps rests on the
lint: every torch factory call in the code that computes on a client's or an attack's tensors
names its device (``device=x.device``), or is moved there at once (``.to(device)``), or is
listed below with the reason it may stay on the CPU.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import pytest
import torch

from fedleak import config, pipeline, seeding
from fedleak.core import Batch, ServerView, Task
from fedleak.defenses import DEFENSES
from fedleak.device import resolve
from fedleak.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CHECKED = [
    *(f"fedleak/{package}" for package in ("attacks", "defenses", "training", "modifiers")),
    "fedleak/metrics",
    "fedleak/federation.py",
    "fedleak/core.py",
]
FACTORIES = {
    "arange",
    "as_tensor",
    "empty",
    "eye",
    "full",
    "linspace",
    "logspace",
    "normal",
    "ones",
    "rand",
    "randint",
    "randn",
    "randperm",
    "range",
    "tensor",
    "zeros",
}
# A factory without device= needs no entry when it is moved at once (``torch.randn(...,
# generator=rng).to(x.device)``: the rule for random draws, since the generator lives on the
# CPU) or read back as Python numbers at once (``int(...)``, ``.tolist()``, ``.item()``).
# Calls that stay on the CPU on purpose, by (file, call as ast.unparse writes it), and why:
EXEMPT = {
    (
        "fedleak/federation.py",
        "torch.randperm(fed.clients, generator=seeding.rng(exp.seed, 'sample', round))",
    ): "the server samples client indices, read back as a list",
    (
        "fedleak/attacks/_matching.py",
        "torch.arange(count, dtype=torch.float64)",
    ): "per-layer weights of the distance, which reads them back as Python floats",
    (
        "fedleak/attacks/_matching.py",
        "torch.ones(count, dtype=torch.float64)",
    ): "per-layer weights of the distance, which reads them back as Python floats",
    (
        "fedleak/defenses/_params.py",
        "torch.zeros(0, dtype=torch.float64)",
    ): "flat() is a CPU float64 vector by design; unflat() puts each part back on its device",
    (
        "fedleak/defenses/noise.py",
        "torch.empty(tensor.shape, dtype=tensor.dtype)",
    ): "Laplace noise is drawn on the CPU generator; the difference is moved on return",
    (
        "fedleak/defenses/optimal.py",
        "torch.full((), self.std, dtype=torch.float64)",
    ): "noise stds are float64 on the CPU by design; moved per tensor when noise is added",
    (
        "fedleak/defenses/optimal.py",
        "torch.tensor(min(ratio, MAX_RATIO), dtype=torch.float64)",
    ): "noise stds are float64 on the CPU by design; moved per tensor when noise is added",
    (
        "fedleak/defenses/quantize.py",
        "torch.rand(levels.shape, generator=rng, dtype=torch.float64)",
    ): "quantisation levels are exact float64 on the CPU; the result is moved on return",
    (
        "fedleak/modifiers/imprint.py",
        "torch.tensor([self.mean - 10 * self.std, *inner], dtype=torch.float64)",
    ): "edges() derives from the options alone (no tensor at hand); its caller moves them",
    (
        "fedleak/modifiers/pooler.py",
        "torch.tensor(0)",
    ): "the honest ablation's only secret, a 0-dim flag its readers take with int()",
    (
        "fedleak/attacks/rgap.py",
        "torch.randn(stage.out_shape, generator=rng, dtype=torch.float64)",
    ): "drawn on the CPU generator and moved, with the work dtype, on the next line",
}
NUMBERS = {"int", "float", "bool"}  # builtins that turn a tensor into a Python number
READS = {"tolist", "item"}  # methods that do


def _leaves_torch(call: ast.Call, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether ``call`` starts a method chain that moves it to a device or reads it back."""
    node: ast.AST = call
    while True:
        parent = parents.get(node)
        if isinstance(parent, ast.Call) and node in parent.args:
            return isinstance(parent.func, ast.Name) and parent.func.id in NUMBERS
        if not (
            isinstance(parent, ast.Attribute) and isinstance(grand := parents.get(parent), ast.Call)
        ):
            return False
        if parent.attr in READS or parent.attr == "cpu":
            return True
        if parent.attr == "to":
            args = [*grand.args, *(k.value for k in grand.keywords)]
            if any("device" in ast.unparse(a) for a in args):
                return True
        node = grand


def _factory_calls() -> list[tuple[str, int, str]]:
    """Every torch factory call under CHECKED that neither names a device nor is moved."""
    found = []
    for entry in CHECKED:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            source = file.read_text()
            tree = ast.parse(source)
            parents = {
                child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)
            }
            for node in ast.walk(tree):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES
                ):
                    continue
                if any(k.arg == "device" for k in node.keywords) or _leaves_torch(node, parents):
                    continue
                found.append((str(file.relative_to(ROOT)), node.lineno, ast.unparse(node)))
    return found


def test_no_tensor_is_created_off_the_device() -> None:
    unexempt = [
        f"{file}:{line}: {call}"
        for file, line, call in _factory_calls()
        if (file, call) not in EXEMPT
    ]
    assert not unexempt, (
        "torch factory calls without device= (pass device=x.device of the tensors at hand, or "
        "draw on the CPU generator and .to(device) at once, or add an exemption with its "
        "reason to EXEMPT):\n" + "\n".join(unexempt)
    )


def test_every_exemption_is_still_needed() -> None:
    calls = {(file, call) for file, _, call in _factory_calls()}
    assert not set(EXEMPT) - calls, "stale EXEMPT entries; remove them"


def _generator_calls() -> list[tuple[str, int, str]]:
    """Calls given a CPU generator that do not draw through a torch factory (checked above)."""
    found = []
    for entry in CHECKED:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text())):
                if not isinstance(node, ast.Call) or not any(
                    k.arg in ("generator", "noise_generator") for k in node.keywords
                ):
                    continue
                func = node.func
                factory = (
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "torch"
                    and func.attr in FACTORIES
                )
                on_factory = (  # torch.empty(...).exponential_(generator=rng): a CPU tensor
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Call)
                    and ast.unparse(func.value.func).removeprefix("torch.") in FACTORIES
                )
                if factory and any(k.arg == "device" for k in node.keywords):
                    found.append((str(file.relative_to(ROOT)), node.lineno, ast.unparse(node)))
                elif not factory and not on_factory:
                    found.append((str(file.relative_to(ROOT)), node.lineno, ast.unparse(func)))
    return found


# Where a CPU generator is handed to something other than a factory, and why that is safe.
GENERATOR_USES = {
    ("fedleak/attacks/_prior.py", "nn.init.kaiming_uniform_"): "fills a CPU tensor, then moved",
    ("fedleak/defenses/dpsgd.py", "torch.utils.data.DataLoader"): "Poisson sampling of indices",
    ("fedleak/defenses/dpsgd.py", "engine.make_private"): "a generator on the model's device",
}


def test_random_draws_are_made_on_the_cpu_generator_then_moved() -> None:
    """A CPU generator cannot draw on another device: never ``generator=`` with ``device=``."""
    calls = _generator_calls()
    unexplained = [f"{f}:{line}: {c}" for f, line, c in calls if (f, c) not in GENERATOR_USES]
    assert not unexplained, "\n".join(unexplained)
    assert set(GENERATOR_USES) <= {(f, c) for f, _, c in calls}, "stale GENERATOR_USES entries"


def test_numpy_is_only_reached_through_the_cpu() -> None:
    """``.numpy()`` fails on a device tensor: it must follow ``.cpu()``."""
    found = []
    for entry in CHECKED:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "numpy"
                    and not node.args
                    and not ast.unparse(node.func.value).endswith(".cpu()")
                ):
                    found.append(f"{file.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


# -- the device key and CPU runs -------------------------------------------------------------


def test_the_device_key_is_checked_when_the_file_loads(tiny) -> None:
    assert config.load(tiny()).device == torch.device("cpu")  # the default
    assert config.load(tiny(device="cpu")).device == torch.device("cpu")
    assert config.load(tiny(device="auto")).device == resolve("auto")
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda, cuda:N, mps, auto"):
        config.load(tiny(device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device = 'cuda:1'.*use device = \"cpu\""):
            config.load(tiny(device="cuda:1"))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_a_federated_round_and_attacks_run_on_an_explicit_cpu_device(tmp_path, tiny) -> None:
    """dlg and inverting_gradients on a round's views, device = "cpu" as with no key at all."""
    attacks = [{"name": "dlg", "steps": 2}, {"name": "inverting_gradients", "steps": 2}]
    run = {"rounds": 1, "observe": {"rounds": [1]}, "attacks": attacks}
    explicit = pipeline.run(config.load(tiny(device="cpu", **run)), tmp_path / "cpu").root
    default = pipeline.run(config.load(tiny(**run)), tmp_path / "default").root
    results = _rows(explicit / "results.csv")
    assert {r["attack"] for r in results} == {"dlg", "inverting_gradients"}
    assert len(results) == 2 * 2  # 2 clients x 2 attacks
    for name in ("utility.csv", "results.csv"):
        assert _rows(explicit / name) == _rows(default / name)


def test_a_view_moves_whole_and_defenses_keep_its_device() -> None:
    """On the meta device (shapes only, no data): nothing is left on, or made on, the CPU."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    batch = Batch(torch.randn(2, 1, 2, 2, generator=seeding.rng(0)), torch.tensor([0, 2]))
    view = ServerView.from_local_step(model, batch, Task("image", (1, 2, 2), 3))
    moved = view.to("meta")
    assert moved.device == torch.device("meta")
    assert all(t.is_meta for t in [*moved.sent.values(), *moved.received.values()])
    assert all(p.is_meta for p in moved.model().parameters())
    assert not any(t.is_meta for t in view.sent.values())  # a copy: the stored view is kept
    delta = moved.delta()
    for name in ("gaussian_noise", "laplacian_noise"):
        defended = DEFENSES[name]()(delta, seeding.rng(0))
        assert all(t.is_meta for t in defended.values()), name
