"""Device support: a lint that no tensor is created off the run's device, and a fake device.

There is no GPU on the machines the tests run on, so correctness on cuda and mps rests on two
checks.  The lint: every torch factory call in the code that computes on a client's or an
attack's tensors names its device (``device=x.device``), or is moved there at once
(``.to(device)``), or is listed below with the reason it may stay on the CPU.  The fake device:
every attack and a client's round (training, defenses, evaluation) run on tensors that report
another device and refuse CPU operands as CUDA does, and must give the CPU's numbers exactly.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fedleak import config, federation, pipeline, seeding
from fedleak.core import Batch, ServerView, Task
from fedleak.defenses import DEFENSES
from fedleak.device import resolve
from fedleak.registry import ConfigError
from fedleak.store import RunStore

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
        "torch.tensor(seeding.derive(exp.seed, 'shared', round), dtype=torch.int64)",
    ): "the public per-round seed is a wire value; local_update moves the instructions",
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
    (
        "fedleak/training/cpt.py",
        "torch.as_tensor(mix, dtype=torch.float32)",
    ): "the group weights a client sends: a wire value, CPU like every message",
    (
        "fedleak/training/zeroth_order.py",
        "torch.tensor(seeds, dtype=torch.int64)",
    ): "the step seeds a client sends: a wire value, CPU like every message",
    (
        "fedleak/training/sufficient_statistics.py",
        "torch.randn(inputs, dim, generator=gen, dtype=torch.float64)",
    ): "the public projection every node derives alike on the CPU; statistics() moves it",
    **{
        ("fedleak/metrics/monosemantic.py", call): "the SAE's parameters are built on the CPU like "
        "any nn.Module's; train_sae moves the module to the features' device"
        for call in (
            "torch.zeros(dim)",
            "torch.zeros(latents)",
            "torch.randn(dim, latents, generator=generator)",
        )
    },
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
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
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


# -- a fake device: every attack and client step computed "off the CPU" ------------------------
#
# The lint sees where tensors are made, not where they meet: a CPU tensor (a prior's scores, a
# table of weights) added to a device tensor passes it and fails on a GPU.  The fake device
# finds those.  Its tensors are CPU tensors wrapped to report the meta device (a device every
# torch build has, whose kernels update a wrapper's shape when an in-place op such as squeeze_
# changes it).  Every op runs on the CPU data underneath, so results must equal the CPU's bit
# for bit; and, as CUDA does, an op refuses a CPU operand with dimensions next to a device
# tensor (CPU scalars and CPU index tensors are allowed), a CPU generator drawing on the device,
# and .numpy().

FAKE = torch.device("meta")
_aten = torch.ops.aten
_INDEXING = {
    _aten.index.Tensor,
    _aten.index_put.default,
    _aten.index_put_.default,
    _aten._index_put_impl_.default,
}


def _faked(device: object) -> bool:
    return device is not None and torch.device(device).type == FAKE.type


class _OnDevice(torch.Tensor):
    """A CPU tensor ``elem`` that reports the fake device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> _OnDevice:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=FAKE,
            requires_grad=elem.requires_grad,
        )

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a fake-device tensor outside fake_device()")


class _Functions(TorchFunctionMode):
    """What happens above dispatch: tensors from Python data, ``.tolist()``, list indices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _faked(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(FAKE)
        if func is torch.Tensor.tolist and isinstance(args[0], _OnDevice):
            return args[0].elem.tolist()
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(
            args[0], _OnDevice
        ):
            # On a device, Python lists in an index become index tensors on that device.
            def listed(i: object) -> object:
                return torch.tensor(i).to(FAKE) if isinstance(i, list) else i

            index = args[1]
            index = tuple(map(listed, index)) if isinstance(index, tuple) else listed(index)
            args = (args[0], index, *args[2:])
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    """Every op: refuse mixed devices, compute on the CPU data, wrap what lands on the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves = pytree.tree_leaves((args, kwargs))
        on = any(isinstance(t, _OnDevice) for t in leaves)
        target = kwargs.get("device", FAKE if on else None)
        if on and func not in (_aten._to_copy.default, _aten.copy_.default):
            indices = {id(t) for t in pytree.tree_leaves(args[1])} if func in _INDEXING else set()
            stray = [
                t
                for t in leaves
                if type(t) is torch.Tensor and t.dim() > 0 and id(t) not in indices
            ]
            if stray:
                shape = tuple(stray[0].shape)
                raise RuntimeError(f"{func}: a CPU tensor {shape} next to device tensors")
        if _faked(target):
            if kwargs.get("generator") is not None:
                raise RuntimeError(f"{func}: a CPU generator cannot draw on the device")
            if "device" in kwargs:
                kwargs["device"] = torch.device("cpu")
        wrappers = {}

        def unwrap(t: object) -> object:
            if isinstance(t, _OnDevice):
                wrappers[id(t.elem)] = t
                return t.elem
            return t

        out = func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs))
        for t in wrappers.values():  # an in-place op that changed the shape (squeeze_, t_, ...)
            if t.shape != t.elem.shape or t.stride() != t.elem.stride():
                with torch._C._DisableTorchDispatch():  # the meta kernel: metadata only
                    _aten.as_strided_.default(
                        t, t.elem.shape, t.elem.stride(), t.elem.storage_offset()
                    )

        def wrap(t: object) -> object:
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) in wrappers:  # an in-place op returns its input
                return wrappers[id(t)]
            return _OnDevice(t) if _faked(target) else t

        return pytree.tree_map(wrap, out)


@contextlib.contextmanager
def fake_device() -> Iterator[torch.device]:
    """Inside: ``x.to(FAKE)`` and ``device=FAKE`` make fake-device tensors."""
    with warnings.catch_warnings():
        # load_state_dict warns that copying into a "meta" parameter is a no-op; here it is not.
        warnings.filterwarnings("ignore", "for .*copying from a non-meta parameter")
        with _Functions(), _Dispatch():
            yield FAKE


def test_the_fake_device_refuses_what_a_gpu_refuses() -> None:
    refused = {
        "add.Tensor: a CPU tensor": lambda x: torch.zeros(3) + x,
        "cat.default: a CPU tensor": lambda x: torch.cat([x, torch.ones(3)]),
        "randn.*CPU generator": lambda x: torch.randn(3, generator=seeding.rng(0), device=x.device),
        "uniform_.*CPU generator": lambda x: nn.init.uniform_(x.clone(), generator=seeding.rng(0)),
        "numpy": lambda x: x.numpy(),
    }
    allowed = [
        lambda x: x * torch.tensor(2.0),  # a CPU scalar
        lambda x: torch.zeros_like(x) + torch.arange(3, device=x.device),
        lambda x: torch.randn(3, generator=seeding.rng(0)).to(x.device) + x,
        lambda x: x[[0, 2]] + x[torch.tensor([1, 2])],  # CPU indices
        lambda x: torch.tensor([1.0, 2.0, 3.0], device=x.device) * x.squeeze_(),
    ]
    with fake_device() as device:
        x = torch.ones(3).to(device)
        for match, op in refused.items():
            with pytest.raises(RuntimeError, match=match):
                op(x)
        for op in allowed:
            assert op(x).device == device
        assert float(x.sum()) == 3.0 and x.tolist() == [1.0, 1.0, 1.0]
        assert type(x.cpu()) is torch.Tensor


DEFENDED = [
    [],
    [{"name": "clip", "max_norm": 1.0}, {"name": "gaussian_noise", "std": 0.01}],
    [{"name": "laplacian_noise", "scale": 0.01}],
    [{"name": "gradient_pruning", "amount": 0.5}],
    [{"name": "quantization", "bits": 4}],
    [{"name": "coordinate_clip", "bound": 0.1}],
    [{"name": "dropout", "p": 0.2}],
    [{"name": "per_example_clip", "max_norm": 1.0}],
    [{"name": "optimal_noise"}],
    [{"name": "optimal_pruning"}],
]


@pytest.mark.parametrize("defenses", DEFENDED, ids=lambda d: "+".join(x["name"] for x in d))
def test_clients_train_defend_and_evaluate_on_a_fake_device(tiny, monkeypatch, defenses) -> None:
    """The client's round and the evaluation as on the CPU, bit for bit; replies on the CPU.

    (dpsgd is left out: Opacus draws its noise with a generator on the model's device.)
    """
    exp = config.load(tiny(defenses=defenses))
    start, _ = federation.server_model(exp, 1, federation.initial_params(exp))
    sent = federation.local_update(exp, 1, 1, start).params  # not the model's initial state
    cpu = federation.local_update(exp, 0, 1, sent)
    monkeypatch.setattr(config.Experiment, "device", property(lambda self: FAKE))
    with fake_device():
        fake = federation.local_update(exp, 0, 1, sent)
        evaluated = federation.evaluate(exp, sent)
    monkeypatch.undo()
    assert all(type(v) is torch.Tensor for v in [*fake.params.values(), fake.truth.inputs])
    assert all(torch.equal(fake.params[k], v) for k, v in cpu.params.items())
    assert torch.equal(fake.truth.inputs, cpu.truth.inputs)
    assert evaluated == federation.evaluate(exp, sent)


_ROUND = {"rounds": 1, "observe": {"rounds": [1]}}
_TEXT = {
    "data": {"name": "demo_text"},
    "model": {"name": "tiny_bert", "layers": 1, "hidden": 32, "heads": 2, "intermediate": 64},
    "training": {"name": "sgd", "lr": 0.01, "batch_size": 2},
}
_LAMP = {  # a few steps of each kind, the bundled corpus as the n-gram prior
    "steps": 4,
    "swap_every": 2,
    "swap_burnin": 0.0,
    "init_candidates": 2,
    "swap_candidates": 3,
    "corpus": "demo",
}
ATTACKED = {
    "gradient_matching": {
        "attacks": [
            {"name": "dlg", "steps": 2},
            {"name": "idlg", "steps": 2},
            {"name": "inverting_gradients", "steps": 2},
        ]
    },
    "imprint": {"modifiers": [{"name": "imprint"}], "attacks": [{"name": "imprint"}]},
    "feature_reconstruction": {
        "model": {"name": "mlp", "hidden": [16], "activation": "relu"},
        "modifiers": [{"name": "gaussian_head", "width": 64, "activation": "relu"}],
        "attacks": [{"name": "feature_reconstruction", "steps": 2}],
    },
    "rgap": {
        "model": {"name": "rgap_cnn"},
        "training": {"name": "sgd", "lr": 0.1, "batch_size": 1},
        "attacks": [{"name": "rgap"}],
    },
    "text": {**_TEXT, "attacks": [{"name": "tag", "steps": 2}, {"name": "lamp", **_LAMP}]},
    "pooler": {
        **_TEXT,
        "modifiers": [{"name": "pooler", "hd": 64, "rd": 8}],
        "attacks": [{"name": "pooler", **_LAMP}],
    },
}


@pytest.mark.parametrize("case", list(ATTACKED))
def test_every_attack_on_a_fake_device_scores_as_on_the_cpu(
    tmp_path, tiny, monkeypatch, request, case
) -> None:
    """The pipeline attacks a run's stored views on the fake device: the CPU's rows, exactly."""
    if case in ("text", "pooler"):
        request.getfixturevalue("text")  # skips without transformers
    exp = config.load(tiny(**_ROUND, **ATTACKED[case]))
    pipeline.run(exp, tmp_path / "cpu")
    shutil.copytree(tmp_path / "cpu", tmp_path / "fake")
    (tmp_path / "fake" / "results.csv").unlink()
    monkeypatch.setattr(config.Experiment, "device", property(lambda self: FAKE))
    with fake_device():
        pipeline.attack(exp, RunStore(tmp_path / "fake"))
    assert _rows(tmp_path / "fake" / "results.csv") == _rows(tmp_path / "cpu" / "results.csv")
