"""Clients as tasks: the server's exact posterior on the shared prior, and a new client's split.

Jeon, Lee, Lei & Van Roy, "An Information-Theoretic Analysis of In-Context Learning", ICML 2024
(arXiv 2401.15530).  Clients are tasks ``theta_m`` drawn from a shared prior ``psi``; the server
is the meta-learner.  This strategy averages the clients' models (FedAvg, so training goes on
as usual) and, from the sufficient statistics each client sends (trainer
``sufficient_statistics``, :mod:`fedleak.training.sufficient_statistics`), keeps the exact
posterior on ``psi`` under a conjugate model (:mod:`fedleak.analysis.meta_learning`): the
Beta-Bernoulli model of one class's rate, or the Gaussian model of the clients' mean inputs
along public directions.  Each round it tells every client

* ``psi_mean``, ``psi_sd``: the posterior on ``psi`` from every client seen so far -- a new
  client's prior;
* ``removable_by_clients``: ``I(D_new; psi | D_seen) / T``, the part of a new client's excess
  log loss per token that more clients would remove (for the Gaussian model it does not depend
  on the data seen; for the Bernoulli one it is estimated with ``draws`` Monte Carlo draws
  from the current posterior);
* ``local_only``: ``I(D_new; theta_new | psi) / T``, the part only the new client's own tokens
  remove;

for a new client holding as many examples as the median client seen.

What leaks: each client's statistics are sufficient for its own ``theta_m``, so they reveal
everything its data say about it (its label rate; its mean input along the directions); the
broadcast posterior is an aggregate.  ``benchmarks/server_strategies/meta_learning.py``
measures the information next to the Bayes attack's error.

A client's statistics are remembered across rounds by client id (the latest replaces the
earlier), so a client sampled twice is not counted twice.  The model's hyper-parameters are
options: on real data the conjugate model is a stand-in, and the numbers are what that model
says.
"""

from __future__ import annotations

import statistics as stats_lib
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from scipy.special import logsumexp

from fedleak.analysis.meta_learning import BernoulliTasks, GaussianTasks
from fedleak.core import Messages, Params, Reply, Setting
from fedleak.server import SERVER_STRATEGIES
from fedleak.server.fedavg import weighted_mean

NEEDS = {"bernoulli": ("count", "tokens"), "gaussian": ("gram", "moment")}


@SERVER_STRATEGIES.register("meta_posterior")
@dataclass
class MetaPosterior:
    """FedAvg, plus the exact posterior on the clients' shared prior from their statistics."""

    sends: ClassVar[dict[str, str]] = {
        "psi_mean": "posterior mean of the shared prior psi (an aggregate of the clients seen)",
        "psi_sd": "its posterior standard deviation, per coordinate",
        "clients_seen": "how many distinct clients the posterior is built from",
        "removable_by_clients": "nats per token of a new client's excess loss more clients "
        "would remove",
        "local_only": "nats per token of a new client's excess loss only its own data remove",
    }

    model: Literal["bernoulli", "gaussian"] = "bernoulli"
    prior_a: float = 1.0  # bernoulli: psi ~ Beta(prior_a, prior_b)
    prior_b: float = 1.0
    concentration: float = 4.0  # bernoulli: theta_m | psi ~ Beta(c psi, c (1 - psi))
    prior_std: float = 1.0  # gaussian: psi ~ N(0, prior_std^2 I)
    task_std: float = 0.5  # gaussian: theta_m | psi ~ N(psi, task_std^2 I)
    noise_std: float = 0.5  # gaussian: each projected input ~ N(theta_m, noise_std^2 I)
    draws: int = 50  # bernoulli: Monte Carlo draws for removable_by_clients
    _seen: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError(f"meta_posterior: draws must be >= 1, got {self.draws}")
        try:
            self.tasks(1)
        except ValueError as err:
            raise ValueError(f"meta_posterior: {err}") from None

    def tasks(self, dim: int) -> GaussianTasks | BernoulliTasks:
        """The conjugate model (the Gaussian one in ``dim`` dimensions)."""
        if self.model == "bernoulli":
            return BernoulliTasks(self.prior_a, self.prior_b, self.concentration)
        return GaussianTasks(dim, self.prior_std, self.task_std, self.noise_std)

    def check(self, setting: Setting) -> None:
        """The trainer sends this model's statistics."""
        trainer = setting.trainer
        if getattr(trainer, "model", None) != self.model or not set(NEEDS[self.model]) <= set(
            getattr(trainer, "sends", {})
        ):
            raise ValueError(
                f"meta_posterior: model = {self.model!r} needs the clients' "
                f"{' and '.join(NEEDS[self.model])}; use training.name = 'sufficient_statistics' "
                f"with training.model = {self.model!r}"
            )

    def instructions(self, round: int, params: Params, rng: torch.Generator) -> Messages:
        """The posterior on psi and a new client's error split, from every client seen."""
        seen = [self._seen[c] for c in sorted(self._seen)]
        if self.model == "gaussian":
            out = self._gaussian(seen)
        else:
            gen = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=rng)))
            out = self._bernoulli(seen, gen)
        out["clients_seen"] = torch.tensor(len(seen), dtype=torch.int64)
        return out

    def _gaussian(self, seen: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not seen:  # nothing seen yet: the prior, and no dimension to speak of
            zero = torch.zeros((), dtype=torch.float64)
            return {"psi_mean": zero, "psi_sd": zero + self.prior_std} | {
                "removable_by_clients": zero,
                "local_only": zero,
            }
        grams = np.stack([s["gram"].numpy() for s in seen])
        moments = np.stack([s["moment"].numpy() for s in seen])
        model = self.tasks(grams.shape[1])
        mean, precision = model.posterior(grams, moments)
        n = stats_lib.median(float(g[0, 0]) for g in grams)
        new = n * np.eye(model.dim)[None]
        tokens = n * model.dim
        removable = model.meta_information(np.concatenate([grams, new])) - model.meta_information(
            grams
        )
        local = float(model.intra_information(new)[0])
        return {
            "psi_mean": torch.from_numpy(mean),
            "psi_sd": torch.from_numpy(np.sqrt(np.diag(np.linalg.inv(precision)))),
            "removable_by_clients": torch.tensor(removable / tokens, dtype=torch.float64),
            "local_only": torch.tensor(local / tokens, dtype=torch.float64),
        }

    def _bernoulli(
        self, seen: list[dict[str, torch.Tensor]], gen: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        model = self.tasks(1)
        psi, w = model.grid
        loglik = np.zeros_like(psi)
        for s in seen:
            t, n = int(s["tokens"]), int(s["count"])
            loglik += model.log_count_probs(t, psi)[:, n]
        log_post = np.log(w) + loglik
        post = np.exp(log_post - logsumexp(log_post))
        mean = float(post @ psi)
        sd = float(np.sqrt(max(post @ psi**2 - mean**2, 0.0)))
        t = int(stats_lib.median(int(s["tokens"]) for s in seen)) if seen else 1
        # I(D_new; psi | D_seen) = E KL(p(psi | D_seen, n_new) || p(psi | D_seen))
        table = model.log_count_probs(t, psi)  # [nodes, t + 1]
        gains = []
        for _ in range(self.draws):
            node = gen.choice(len(psi), p=post)
            a, b = model.concentration * psi[node], model.concentration * (1 - psi[node])
            n_new = gen.binomial(t, np.clip(gen.beta(a, b), 1e-12, 1 - 1e-12))
            new_log = log_post + table[:, n_new]
            new_post = np.exp(new_log - logsumexp(new_log))
            gains.append(float(new_post @ (table[:, n_new] - logsumexp(table[:, n_new], b=post))))
        return {
            "psi_mean": torch.tensor(mean, dtype=torch.float64),
            "psi_sd": torch.tensor(sd, dtype=torch.float64),
            "removable_by_clients": torch.tensor(np.mean(gains) / t, dtype=torch.float64),
            "local_only": torch.tensor(model.intra_information(t) / t, dtype=torch.float64),
        }

    def aggregate(self, round: int, params: Params, replies: list[Reply]) -> Params:
        """Remember each replying client's statistics, then average the states (FedAvg)."""
        for reply in replies:
            if all(k in reply.messages for k in NEEDS[self.model]):
                self._seen[reply.client] = {
                    k: reply.messages[k].detach().to("cpu", torch.float64)
                    for k in NEEDS[self.model]
                }
        return weighted_mean([r.params for r in replies], [r.num_examples for r in replies])
