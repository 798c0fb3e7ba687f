"""DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) through Opacus.

Each local step Poisson-samples the client's examples (each one independently, with rate q),
clips every per-example gradient to L2 norm ``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier · max_grad_norm`` to their sum.  This is record-level DP for one client's
data, the defense with a formal guarantee against any reconstruction attack: no update depends
much on any one example.  Opacus (Yousefpour et al. 2021) does the per-example work:
``PrivacyEngine.make_private`` wraps the model in a ``GradSampleModule`` (which shares the
model's parameters, so the trainer's steps land in the client's model and its state-dict keys
are unchanged), the optimiser in a ``DPOptimizer`` and the data in a Poisson ``DPDataLoader``.

Choices and caveats:

* The data set is the client's whole partition (the trainer passes it as ``data``), and the
  expected batch size is the trainer's: q = 1 / ceil(n / batch_size), Opacus's choice
  (≈ batch_size/n), whatever the number of local steps.  (Sampling from the examples of the
  planned batches instead, as an earlier version did, overstated q with less than an epoch of
  steps: four steps of four on 100 examples gave q = 1/4, not 1/25.)
* The client makes as many Poisson draws as the trainer planned steps.  Poisson sampling can
  draw an empty batch; the trainer cannot step on one (its mean loss would be NaN), so empty
  draws are skipped and the recorded ground truth is the examples actually drawn.  Accounting
  for every planned draw (``epsilon`` with the planned step count) is then conservative, but the
  number of steps a client reports reveals how many draws were empty.  When every draw of a
  round is empty (probability about e^(-batch_size · steps)), the client has nothing to send:
  its round fails with a message saying so, and the server carries on with the others.
* ε composes over a client's whole history: ``epsilon(steps, sample_rate)`` gives it for all the
  local steps of all rounds the client took part in.  Flower's Opacus example builds a new
  ``PrivacyEngine`` each round and so reports one round's ε; the engine built here is
  likewise discarded, and only ``epsilon`` should be reported.  :func:`accounting` does that
  for a whole run (every client's rounds from the seeded sampling, its planned steps and q);
  ``fedleak run`` writes it into ``meta.json`` under ``"dpsgd"``.
* Randomness (sampling and noise) comes from the client's ``rng``, so runs are reproducible from
  the experiment seed; this is Opacus's non-secure mode, fine for research, not for deployment.
* Per-example gradients need layers that treat examples independently: BatchNorm mixes them
  and is refused (``check``); build the model with group norm instead (``norm = "group"``).

Threat model: the client trains privately; the server sees the noisy update and may run any
attack on it.  The guarantee covers the client's records, not which client took part.
"""

from __future__ import annotations

import itertools
import math
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fedleak.core import Batch, Setting
from fedleak.defenses import DEFENSES


@DEFENSES.register("dpsgd")
@dataclass
class DPSGD:
    """DP-SGD with Opacus: Poisson sampling, per-example clipping, Gaussian noise."""

    noise_multiplier: float = 1.0  # noise std / max_grad_norm (Opacus's sigma)
    max_grad_norm: float = 1.0  # L2 bound on each per-example gradient
    delta: float = 1e-5  # the δ of the (ε, δ) guarantee that epsilon() reports
    accountant: Literal["rdp", "prv"] = "rdp"  # Opacus accountant: Rényi DP or PRV (tighter)

    def __post_init__(self) -> None:
        if not 0 <= self.noise_multiplier < math.inf:  # also rejects NaN
            raise ValueError(
                f"dpsgd: noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}"
            )
        if not 0 < self.max_grad_norm < math.inf:
            raise ValueError(
                f"dpsgd: max_grad_norm must be > 0 and finite, got {self.max_grad_norm}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"dpsgd: delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"dpsgd: accountant must be 'rdp' or 'prv', got {self.accountant!r}")

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Iterable[Batch],
        rng: torch.Generator,
        *,
        data: Batch,
    ) -> tuple[nn.Module, torch.optim.Optimizer, list[Batch]]:
        """Make ``model`` and ``optimizer`` private; replace ``batches`` by Poisson draws.

        The draws sample ``data`` (the client's whole partition), one per planned batch.
        """
        opacus = _opacus()
        self.validate(model)
        planned = list(batches)
        if not planned or len(data) == 0:
            return model, optimizer, []
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.inputs, data.labels),
            batch_size=len(planned[0]),  # the trainer's batch size (only the last may be smaller)
            generator=rng,  # Opacus's Poisson sampler inherits it
        )
        with warnings.catch_warnings():
            # Deliberate: seeded (non-secure) randomness is what makes runs reproducible.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = opacus.PrivacyEngine(accountant=self.accountant)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            noise_generator=_noise_generator(model, rng),
        )
        # One Poisson draw per planned step; each pass over the loader is ceil(n / batch) draws.
        passes = itertools.chain.from_iterable(itertools.repeat(loader))
        draws = itertools.islice(passes, len(planned))
        return model, optimizer, [Batch(x, y) for x, y in draws if len(y) > 0]

    def check(self, setting: Setting) -> None:
        """Refuse, when the experiment loads, a model this defense cannot train."""
        self.validate(setting.model)

    def validate(self, model: nn.Module) -> None:
        """Raise ValueError if Opacus cannot compute per-example gradients for ``model``."""
        opacus = _opacus()
        problems = opacus.validators.ModuleValidator.validate(model, strict=False)
        if not problems:
            return
        # Opacus's messages run to a paragraph each; their first sentences say what is wrong.
        listed = "; ".join(dict.fromkeys(str(p).split(". ")[0].rstrip(".") for p in problems))
        fix = " Opacus's ModuleValidator.validate(model) explains each problem and its fix."
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            fix = (
                " BatchNorm mixes the examples of a batch, so per-example gradients do not "
                'exist; use group norm instead (in the config: [model] norm = "group").'
            )
        raise ValueError(f"dpsgd: Opacus cannot train this model privately: {listed}.{fix}")

    def sample_rate(self, examples: int, batch_size: int) -> float:
        """The Poisson rate q that ``wrap`` uses for ``examples`` at ``batch_size`` per step."""
        return 1 / math.ceil(examples / min(batch_size or examples, examples))

    def epsilon(self, steps: int, sample_rate: float) -> float:
        """ε after ``steps`` local steps at Poisson rate ``sample_rate``, at this ``delta``.

        ``steps`` is a client's whole history: every local step of every round it took part in
        (all at the same rate q).  The accountant is Opacus's, fed that history at once.
        """
        if steps < 0 or not 0 < sample_rate <= 1:
            raise ValueError(
                f"dpsgd: need steps >= 0 and sample_rate in (0, 1], got {steps}, {sample_rate}"
            )
        if steps == 0:
            return 0.0
        if self.noise_multiplier == 0:  # no noise: no guarantee
            return math.inf
        accountant = _opacus().accountants.create_accountant(self.accountant)
        accountant.history = [(self.noise_multiplier, sample_rate, steps)]
        return float(accountant.get_epsilon(delta=self.delta))


def _noise_generator(model: nn.Module, rng: torch.Generator) -> torch.Generator:
    """The generator Opacus draws its noise with, on the device of the model's parameters.

    Opacus draws on the parameters' device and a generator lives on one device: on the CPU it
    is ``rng`` itself (CPU runs unchanged); elsewhere a generator there, seeded from ``rng``,
    so the noise is reproducible per device but not the same numbers as on the CPU.
    """
    device = next(model.parameters()).device
    if device.type == "cpu":
        return rng
    seed = int(torch.randint(2**62, (1,), generator=rng))
    return torch.Generator(device=device).manual_seed(seed)


def _opacus() -> types.ModuleType:
    """The opacus package (an optional dependency: imported when a method needs it)."""
    try:
        import opacus
        import opacus.accountants
        import opacus.validators
    except ImportError:
        raise ImportError('dpsgd needs opacus: pip install "fedleak[dp]"') from None
    return opacus


def accounting(exp: Any) -> dict[str, Any] | None:
    """Every client's DP-SGD privacy loss over a whole run of ``exp``; None without ``dpsgd``.

    Computed from the experiment, which fixes everything the accountant needs: the rounds a
    client takes part in (the seeded sampling, ``federation.sample_clients``), its partition
    size n and the trainer's planned steps per round (each one Poisson draw at q =
    ``sample_rate(n, batch_size)``, empty or not).  A client that failed in a round is still
    counted for it, so the ε reported can only be conservative.  ``epsilon`` is the largest over
    clients: the guarantee every client's records have.
    """
    from fedleak import federation  # imported late: fedleak.config imports this package

    defense = next((d for d in exp.defenses if isinstance(d, DPSGD)), None)
    if defense is None:
        return None
    trainer = exp.trainer
    if not hasattr(trainer, "planned_steps"):
        raise ValueError(
            f"dpsgd: cannot account for trainer {trainer.name!r}: it does not say how many "
            "steps it plans per round (planned_steps)"
        )
    rounds = dict.fromkeys(range(exp.federation.clients), 0)
    for r in range(1, exp.federation.rounds + 1):
        for client in federation.sample_clients(exp, r):
            rounds[client] += 1
    batch_size = int(getattr(trainer, "batch_size", 0))
    clients, cache = [], {}
    for client, taken in rounds.items():
        n = len(exp.partitions()[client])
        steps = taken * trainer.planned_steps(n)
        rate = defense.sample_rate(n, batch_size) if n else 1.0
        if (steps, rate) not in cache:  # iid partitions repeat the same (steps, q) often
            cache[steps, rate] = defense.epsilon(steps, rate)
        clients.append(
            {
                "client": client,
                "examples": n,
                "rounds": taken,
                "steps": steps,
                "sample_rate": rate,
                "epsilon": cache[steps, rate],
            }
        )
    return {
        "epsilon": max(c["epsilon"] for c in clients),
        "delta": defense.delta,
        "noise_multiplier": defense.noise_multiplier,
        "max_grad_norm": defense.max_grad_norm,
        "accountant": defense.accountant,
        "clients": clients,
    }
