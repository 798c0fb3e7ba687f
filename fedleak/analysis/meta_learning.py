"""The meta-learning error decomposition, computed exactly for conjugate models of client tasks.

Jeon, Lee, Lei & Van Roy, "An Information-Theoretic Analysis of In-Context Learning", ICML 2024
(arXiv 2401.15530).  A meta-parameter ``psi`` (the shared world) draws tasks
``theta_1..theta_M | psi`` i.i.d.; task m emits ``T`` tokens ``D_m``.  The Bayes-optimal
cumulative log loss per token, ``H(D) / (M T)``, splits by the chain rule of mutual
information into

* irreducible error   ``H(D | psi, theta_{1:M}) / (M T)``: noise no data can remove;
* meta-learning error ``I(D; psi) / (M T)``: what is still unknown about the shared prior;
* intra-task error    ``I(D; theta_{1:M} | psi) / (M T)``: what each task must learn itself.

Federated reading (fedleak): clients are tasks and the server is the meta-learner.  A *new*
client's excess loss splits the same way: ``I(D_new; psi | D_{1:M}) / T`` falls as more clients
join, ``I(D_new; theta_new | psi) / T`` only as that client sees more tokens.  The clients'
sufficient statistics are the messages that make the server's posterior on ``psi`` exact; what
they reveal about each client's own parameter is computed here exactly (Gaussian) or by
quadrature (Bernoulli), next to the Bayes-optimal attack that recovers it.

Two conjugate models:

* :class:`GaussianTasks`: linear regression, ``psi ~ N(0, s^2 I_d)``,
  ``theta_m | psi ~ N(psi, tau^2 I_d)``, ``y = <theta_m, x> + N(0, sigma^2)`` with
  ``x ~ N(0, I_d)``; every term is a log-determinant given the clients' designs (their Gram
  matrices ``X_m^T X_m``), so Monte Carlo is needed only over the inputs.
* :class:`BernoulliTasks`: ``psi ~ Beta(a, b)``, ``theta_m | psi ~ Beta(c psi, c (1 - psi))``,
  tokens ``~ Bernoulli(theta_m)``; the irreducible and intra-task terms are exact sums over the
  counts with Gauss-Jacobi quadrature over ``psi``, the meta term is the expected
  Kullback-Leibler divergence from prior to posterior, estimated by Monte Carlo over the counts.

Where this departs from the paper: the paper bounds the terms for general (transformer)
generators with rate-distortion arguments and has no code or experiments; here the terms are
exact, so the bounds' rates (meta ~ dim(psi) log(M T) / (M T), intra ~ dim(theta) log T / T)
can be set against exact numbers.  Inputs ``x`` are exogenous: the loss is on ``y`` given
``x``.  All randomness comes from an explicit ``np.random.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import betaln, digamma, gammaln, logsumexp, roots_jacobi

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class Terms:
    """The three terms of the decomposition, in nats per token, for M clients of T tokens."""

    clients: int
    tokens: int
    irreducible: float
    meta: float
    intra: float

    @property
    def total(self) -> float:
        """The Bayes-optimal cumulative log loss per token."""
        return self.irreducible + self.meta + self.intra


@dataclass(frozen=True)
class Leakage:
    """What one client's sufficient statistics reveal about its own parameter ``theta_m``."""

    message_only: np.ndarray  # I(message_m; theta_m), nats: an attacker knowing only the prior
    with_others: np.ndarray  # I(all messages; theta_m): the server, which holds every message
    beyond_population: np.ndarray  # I(message_m; theta_m | psi): the intra-task information
    estimate: np.ndarray  # the Bayes attack's estimate of theta_m (posterior mean)
    posterior_mse: np.ndarray  # its expected squared error (trace of the posterior covariance)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of Monte Carlo draws (0 error for a single draw)."""
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(se)


def _check_sizes(clients: int, tokens: int, draws: int | None = None) -> None:
    if clients < 1 or tokens < 1:
        raise ValueError(f"need clients >= 1 and tokens >= 1, got M = {clients}, T = {tokens}")
    if draws is not None and draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")


@dataclass(frozen=True)
class GaussianTasks:
    """Hierarchical Gaussian linear regression: every term is a log-determinant."""

    dim: int = 8  # d, the dimension of psi and of each theta_m
    prior_std: float = 1.0  # s: psi ~ N(0, s^2 I)
    task_std: float = 0.5  # tau: theta_m | psi ~ N(psi, tau^2 I)
    noise_std: float = 0.5  # sigma: y = <theta_m, x> + N(0, sigma^2)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"gaussian tasks: dim must be >= 1, got {self.dim}")
        for name in ("prior_std", "task_std", "noise_std"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"gaussian tasks: {name} must be > 0, got {getattr(self, name)}; a zero "
                    "variance makes the model degenerate"
                )

    @property
    def _s2(self) -> float:
        return self.prior_std**2

    @property
    def _t2(self) -> float:
        return self.task_std**2

    @property
    def _v2(self) -> float:
        return self.noise_std**2

    def sample(
        self, clients: int, tokens: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One draw of the world: ``psi [d]``, ``theta [M, d]``, inputs ``[M, T, d]``, targets."""
        _check_sizes(clients, tokens)
        psi = self.prior_std * rng.standard_normal(self.dim)
        theta = psi + self.task_std * rng.standard_normal((clients, self.dim))
        inputs = rng.standard_normal((clients, tokens, self.dim))
        noise = self.noise_std * rng.standard_normal((clients, tokens))
        return psi, theta, inputs, np.einsum("mtd,md->mt", inputs, theta) + noise

    @staticmethod
    def statistics(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each client's sufficient statistics ``(X^T X [M, d, d], X^T y [M, d])``."""
        return np.einsum("mti,mtj->mij", inputs, inputs), np.einsum("mti,mt->mi", inputs, targets)

    def _precision_terms(self, gram: np.ndarray) -> np.ndarray:
        """``A_m = X_m^T C_m^{-1} X_m = G_m (sigma^2 I + tau^2 G_m)^{-1}`` per client."""
        eye = np.eye(self.dim)
        a = np.linalg.solve(self._v2 * eye + self._t2 * gram, gram)  # G and C commute
        return (a + np.swapaxes(a, -1, -2)) / 2

    def intra_information(self, gram: np.ndarray) -> np.ndarray:
        """``I(D_m; theta_m | psi)`` per client (nats): ``1/2 logdet(I + tau^2/sigma^2 G_m)``."""
        return 0.5 * np.linalg.slogdet(np.eye(self.dim) + (self._t2 / self._v2) * gram)[1]

    def meta_information(self, gram: np.ndarray) -> float:
        """``I(D; psi)`` (nats) for the clients of ``gram``: ``1/2 logdet(I + s^2 sum_m A_m)``."""
        if len(gram) == 0:
            return 0.0
        total = self._precision_terms(gram).sum(0)
        return 0.5 * float(np.linalg.slogdet(np.eye(self.dim) + self._s2 * total)[1])

    def irreducible(self) -> float:
        """``H(y | x, theta)`` per token: the noise's entropy, ``1/2 ln(2 pi e sigma^2)``."""
        return 0.5 * (LOG_2PI + 1 + math.log(self._v2))

    def terms(self, gram: np.ndarray, tokens: int) -> Terms:
        """The exact decomposition given the clients' designs (Gram matrices ``[M, d, d]``)."""
        clients = len(gram)
        n = clients * tokens
        return Terms(
            clients,
            tokens,
            self.irreducible(),
            self.meta_information(gram) / n,
            float(self.intra_information(gram).sum()) / n,
        )

    def joint_entropy(self, inputs: np.ndarray) -> float:
        """``h(Y | X) / (M T)`` from the full ``MT x MT`` covariance: the check of :meth:`terms`."""
        clients, tokens, _ = inputs.shape
        flat = inputs.reshape(clients * tokens, self.dim)
        cov = self._s2 * flat @ flat.T + self._v2 * np.eye(len(flat))
        for m in range(clients):
            block = slice(m * tokens, (m + 1) * tokens)
            cov[block, block] += self._t2 * inputs[m] @ inputs[m].T
        logdet = np.linalg.slogdet(cov)[1]
        return 0.5 * (len(flat) * (LOG_2PI + 1) + logdet) / len(flat)

    def closed_form(self, clients: int, tokens: int) -> Terms:
        """The terms for an orthogonal design (``X_m^T X_m = T I``): no log-determinant left."""
        _check_sizes(clients, tokens)
        d, t = self.dim, tokens
        intra = clients * d / 2 * math.log1p(self._t2 * t / self._v2)
        meta = d / 2 * math.log1p(self._s2 * clients * t / (self._v2 + self._t2 * t))
        n = clients * tokens
        return Terms(clients, tokens, self.irreducible(), meta / n, intra / n)

    def _grams(self, clients: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_normal((clients, tokens, self.dim))
        return np.einsum("mti,mtj->mij", x, x)

    def expected_terms(
        self, clients: int, tokens: int, rng: np.random.Generator, draws: int
    ) -> tuple[Terms, Terms]:
        """The terms averaged over Gaussian inputs (exact given each draw): mean, standard error."""
        _check_sizes(clients, tokens, draws)
        got = [self.terms(self._grams(clients, tokens, rng), tokens) for _ in range(draws)]
        meta = _mean_se([g.meta for g in got])
        intra = _mean_se([g.intra for g in got])
        irr = self.irreducible()
        return (
            Terms(clients, tokens, irr, meta[0], intra[0]),
            Terms(clients, tokens, 0.0, meta[1], intra[1]),
        )

    def posterior(self, gram: np.ndarray, moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The server's posterior on ``psi`` from the clients' messages: mean and precision."""
        eye = np.eye(self.dim)
        solve = np.linalg.solve(self._v2 * eye + self._t2 * gram, moment[..., None])[..., 0]
        precision = eye / self._s2 + self._precision_terms(gram).sum(0)
        return np.linalg.solve(precision, solve.sum(0)), precision

    def log_losses(
        self,
        psi: np.ndarray,
        theta: np.ndarray,
        inputs: np.ndarray,
        targets: np.ndarray,
    ) -> tuple[float, float, float]:
        """Cumulative log losses per token of three predictors on one draw.

        The Bayes predictor (``-ln p(Y | X)``), the one that knows ``psi``, and the one that
        knows every ``theta_m``; their differences estimate the meta and intra terms.
        """
        clients, tokens, d = inputs.shape
        n = clients * tokens
        resid = targets - np.einsum("mtd,md->mt", inputs, theta)
        given_theta = 0.5 * (n * (LOG_2PI + math.log(self._v2)) + (resid**2).sum() / self._v2)
        gram, moment = self.statistics(inputs, targets)
        given_psi = self._log_loss_given(psi, inputs, targets, gram)
        # Bayes' rule at psi0, the posterior mean:
        # ln p(Y) = ln p(Y | psi0) + ln p(psi0) - ln p(psi0 | Y)
        mean, precision = self.posterior(gram, moment)
        log_prior = -0.5 * (d * (LOG_2PI + math.log(self._s2)) + mean @ mean / self._s2)
        log_post = -0.5 * (d * LOG_2PI - np.linalg.slogdet(precision)[1])
        bayes = self._log_loss_given(mean, inputs, targets, gram) - log_prior + log_post
        return bayes / n, given_psi / n, given_theta / n

    def _log_loss_given(
        self, psi: np.ndarray, inputs: np.ndarray, targets: np.ndarray, gram: np.ndarray
    ) -> float:
        """``-ln p(Y | X, psi)``: per client ``N(X psi, sigma^2 I + tau^2 X X^T)`` by Woodbury."""
        tokens = inputs.shape[1]
        resid = targets - np.einsum("mtd,d->mt", inputs, psi)
        u = np.einsum("mtd,mt->md", inputs, resid)
        inner = (self._v2 / self._t2) * np.eye(self.dim) + gram
        solved = np.linalg.solve(inner, u[..., None])[..., 0]
        quad = ((resid**2).sum(1) - np.einsum("md,md->m", u, solved)) / self._v2
        logdet = tokens * math.log(self._v2) + 2 * self.intra_information(gram)
        return float(0.5 * (tokens * LOG_2PI + logdet + quad).sum())

    def monte_carlo(
        self, clients: int, tokens: int, rng: np.random.Generator, draws: int
    ) -> tuple[Terms, Terms]:
        """The terms estimated from sampled worlds and realised log losses: mean, standard error."""
        _check_sizes(clients, tokens, draws)
        losses = np.array(
            [self.log_losses(*self.sample(clients, tokens, rng)) for _ in range(draws)]
        )
        bayes, given_psi, given_theta = losses.T
        irr, meta, intra = (
            _mean_se(given_theta),
            _mean_se(bayes - given_psi),
            _mean_se(given_psi - given_theta),
        )
        return (
            Terms(clients, tokens, irr[0], meta[0], intra[0]),
            Terms(clients, tokens, irr[1], meta[1], intra[1]),
        )

    def new_client(
        self, clients: int, tokens: int, rng: np.random.Generator, draws: int
    ) -> tuple[float, float, float, float]:
        """A new client's excess loss per token after ``clients`` others, split in two.

        What more clients can remove (``I(D_new; psi | D_{1:M}) / T``) and what only more local
        tokens can (``I(D_new; theta_new | psi) / T``), each with its standard error over draws.
        """
        if clients < 0:
            raise ValueError(f"clients must be >= 0, got {clients}")
        _check_sizes(1, tokens, draws)
        removable, local = [], []
        for _ in range(draws):
            gram = self._grams(clients + 1, tokens, rng)
            removable.append(
                (self.meta_information(gram) - self.meta_information(gram[:clients])) / tokens
            )
            local.append(float(self.intra_information(gram[-1:])[0]) / tokens)
        (r, r_se), (c, c_se) = _mean_se(removable), _mean_se(local)
        return r, r_se, c, c_se

    def leakage(self, gram: np.ndarray, moment: np.ndarray) -> Leakage:
        """What each client's message ``(X^T X, X^T y)`` reveals about its own ``theta_m``.

        The message is sufficient for ``theta_m`` given ``X_m``, so its information equals the
        data's.  The attack is Bayes-optimal: the posterior mean of ``theta_m`` under the
        prior the server learns from the *other* clients' messages.
        """
        eye = np.eye(self.dim)
        prior_var = self._s2 + self._t2
        about = 0.5 * np.linalg.slogdet(eye + (prior_var / self._v2) * gram)[1]
        beyond = self.intra_information(gram)
        a = self._precision_terms(gram)
        b = np.linalg.solve(self._v2 * eye + self._t2 * gram, moment[..., None])[..., 0]
        precision_all = eye / self._s2 + a.sum(0)
        estimates, mse, known = [], [], []
        for m in range(len(gram)):
            precision = precision_all - a[m]  # leave client m out: no double counting
            mean = np.linalg.solve(precision, b.sum(0) - b[m])
            prior_cov = np.linalg.inv(precision) + self._t2 * eye
            prior_precision = np.linalg.inv(prior_cov)
            post_precision = prior_precision + gram[m] / self._v2
            post_cov = np.linalg.inv(post_precision)
            estimates.append(post_cov @ (prior_precision @ mean + moment[m] / self._v2))
            mse.append(np.trace(post_cov))
            known.append(0.5 * (self.dim * math.log(prior_var) - np.linalg.slogdet(post_cov)[1]))
        return Leakage(about, np.array(known), beyond, np.array(estimates), np.array(mse))

    def mse_bound(self, information: np.ndarray) -> np.ndarray:
        """The least squared error on ``theta_m`` of any attacker holding this much information.

        The entropy-power bound ``d (s^2 + tau^2) exp(-2 I / d)``; equality for a Gaussian
        posterior with isotropic covariance.
        """
        return self.dim * (self._s2 + self._t2) * np.exp(-2 * np.asarray(information) / self.dim)


@dataclass(frozen=True)
class BernoulliTasks:
    """Hierarchical Beta-Bernoulli: one shared mean, one coin per client."""

    prior_a: float = 1.0  # psi ~ Beta(a, b): the population's mean rate
    prior_b: float = 1.0
    concentration: float = 4.0  # c: theta_m | psi ~ Beta(c psi, c (1 - psi)); small = diverse
    nodes: int = 512  # Gauss-Jacobi nodes over psi

    def __post_init__(self) -> None:
        for name in ("prior_a", "prior_b", "concentration"):
            if not getattr(self, name) > 0:
                raise ValueError(f"bernoulli tasks: {name} must be > 0, got {getattr(self, name)}")
        if self.nodes < 8:
            raise ValueError(f"bernoulli tasks: nodes must be >= 8, got {self.nodes}")

    @cached_property
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Quadrature nodes over ``psi`` and their weights (an expectation under Beta(a, b))."""
        # Jacobi weight (1 - u)^alpha (1 + u)^beta with psi = (1 + u) / 2 is Beta(beta+1, alpha+1)
        u, w = roots_jacobi(self.nodes, self.prior_b - 1, self.prior_a - 1)
        return (1 + u) / 2, w / w.sum()

    def _shapes(self, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.concentration * psi, self.concentration * (1 - psi)

    def log_count_probs(self, tokens: int, psi: np.ndarray) -> np.ndarray:
        """``ln P(n | psi)`` for n = 0..T (beta-binomial), one row per value of ``psi``."""
        a, b = (s[:, None] for s in self._shapes(np.atleast_1d(psi)))
        n = np.arange(tokens + 1)
        choose = gammaln(tokens + 1) - gammaln(n + 1) - gammaln(tokens - n + 1)
        return choose + betaln(a + n, b + tokens - n) - betaln(a, b)

    def _entropy_given_theta(self, tokens: int) -> np.ndarray:
        """``E[H(Binomial(T, theta)) | psi]`` per node, exactly (digamma moments of the Beta)."""
        psi, _ = self.grid
        a, b = (s[:, None] for s in self._shapes(psi))
        n = np.arange(tokens + 1)
        choose = gammaln(tokens + 1) - gammaln(n + 1) - gammaln(tokens - n + 1)
        p = np.exp(self.log_count_probs(tokens, psi))
        end = digamma(a + b + tokens)
        log_p = choose + n * (digamma(a + n) - end) + (tokens - n) * (digamma(b + tokens - n) - end)
        return -(p * log_p).sum(1)

    def irreducible(self) -> float:
        """``E[H(Bernoulli(theta))]`` per token."""
        return float(self.grid[1] @ self._entropy_given_theta(1))

    def intra_information(self, tokens: int) -> float:
        """``I(D_m; theta_m | psi)`` for one client of T tokens (nats), exact up to quadrature."""
        psi, w = self.grid
        log_p = self.log_count_probs(tokens, psi)
        given_psi = -(np.exp(log_p) * log_p).sum(1)
        return float(w @ (given_psi - self._entropy_given_theta(tokens)))

    def information_about_theta(self, tokens: int) -> float:
        """``I(n_m; theta_m)``: what one client's count tells an attacker knowing the prior."""
        psi, w = self.grid
        marginal = logsumexp(self.log_count_probs(tokens, psi) + np.log(w)[:, None], axis=0)
        return float(-(np.exp(marginal) * marginal).sum() - w @ self._entropy_given_theta(tokens))

    def meta_information_given(self, counts: np.ndarray, tokens: int) -> float:
        """``KL(p(psi | counts) || p(psi))``: what these messages told the server about ``psi``.

        Its expectation over the counts is ``I(D; psi)`` (the counts are sufficient).
        """
        counts = np.asarray(counts, dtype=int)
        if len(counts) == 0:
            return 0.0
        psi, w = self.grid
        loglik = self.log_count_probs(tokens, psi)[:, counts].sum(1)
        log_evidence = logsumexp(loglik, b=w)
        post = w * np.exp(loglik - log_evidence)
        return float(post @ loglik - log_evidence)

    def sample(
        self, clients: int, tokens: int, rng: np.random.Generator
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """One draw: ``psi``, ``theta [M]`` and each client's count of ones ``[M]``."""
        _check_sizes(clients, tokens)
        psi = rng.beta(self.prior_a, self.prior_b)
        a, b = self._shapes(np.array(psi))
        # Beta(a, b) with a tiny shape can round to exactly 0 or 1; keep theta inside (0, 1)
        theta = np.clip(rng.beta(a, b, size=clients), 1e-12, 1 - 1e-12)
        return float(psi), theta, rng.binomial(tokens, theta)

    def terms(
        self, clients: int, tokens: int, rng: np.random.Generator, draws: int
    ) -> tuple[Terms, Terms]:
        """Irreducible and intra exact; meta by Monte Carlo over counts: mean, standard error."""
        _check_sizes(clients, tokens, draws)
        n = clients * tokens
        meta = _mean_se(
            [
                self.meta_information_given(self.sample(clients, tokens, rng)[2], tokens) / n
                for _ in range(draws)
            ]
        )
        intra = self.intra_information(tokens) / tokens
        return (
            Terms(clients, tokens, self.irreducible(), meta[0], intra),
            Terms(clients, tokens, 0.0, meta[1], 0.0),
        )

    def log_losses(
        self, psi: float, theta: np.ndarray, counts: np.ndarray, tokens: int
    ) -> tuple[float, float, float]:
        """Cumulative log losses per token of three predictors on one draw.

        The Bayes predictor, the one knowing ``psi`` and the one knowing every ``theta_m`` (a
        sequence's probability depends only on its count).
        """
        n = len(counts) * tokens
        given_theta = -(counts * np.log(theta) + (tokens - counts) * np.log1p(-theta)).sum()
        a, b = self._shapes(np.array(psi))
        given_psi = -(betaln(a + counts, b + tokens - counts) - betaln(a, b)).sum()
        nodes, w = self.grid
        an, bn = (s[:, None] for s in self._shapes(nodes))
        loglik = (betaln(an + counts, bn + tokens - counts) - betaln(an, bn)).sum(1)
        bayes = -logsumexp(loglik, b=w)
        return bayes / n, float(given_psi) / n, float(given_theta) / n

    def monte_carlo(
        self, clients: int, tokens: int, rng: np.random.Generator, draws: int
    ) -> tuple[Terms, Terms]:
        """The terms from sampled worlds and realised log losses: mean, standard error."""
        _check_sizes(clients, tokens, draws)
        losses = []
        for _ in range(draws):
            psi, theta, counts = self.sample(clients, tokens, rng)
            losses.append(self.log_losses(psi, theta, counts, tokens))
        bayes, given_psi, given_theta = np.array(losses).T
        irr, meta, intra = (
            _mean_se(given_theta),
            _mean_se(bayes - given_psi),
            _mean_se(given_psi - given_theta),
        )
        return (
            Terms(clients, tokens, irr[0], meta[0], intra[0]),
            Terms(clients, tokens, irr[1], meta[1], intra[1]),
        )

    def new_client(
        self, clients: int, tokens: int, rng: np.random.Generator, draws: int
    ) -> tuple[float, float, float, float]:
        """As :meth:`GaussianTasks.new_client`, per token.

        Removable by more clients (with its standard error over draws) and local-only (exact,
        error 0).
        """
        if clients < 0:
            raise ValueError(f"clients must be >= 0, got {clients}")
        _check_sizes(1, tokens, draws)
        removable = []
        for _ in range(draws):
            counts = self.sample(clients + 1, tokens, rng)[2]
            gain = self.meta_information_given(counts, tokens)
            before = self.meta_information_given(counts[:clients], tokens)
            removable.append((gain - before) / tokens)
        r, r_se = _mean_se(removable)
        return r, r_se, self.intra_information(tokens) / tokens, 0.0

    def attack(self, counts: np.ndarray, tokens: int) -> np.ndarray:
        """The Bayes attack: each client's posterior mean of ``theta_m`` given every count.

        Its count, under the prior on ``psi`` the server learns from the other clients' counts.
        """
        counts = np.asarray(counts, dtype=int)
        psi, w = self.grid
        table = self.log_count_probs(tokens, psi)[:, counts]  # [nodes, M]
        log_post = np.log(w)[:, None] + table.sum(1, keepdims=True)  # all clients: includes m once
        log_post = log_post - logsumexp(log_post, axis=0)
        post = np.exp(log_post)  # p(psi | all counts) = p(psi | others, n_m) for each m
        a, _ = self._shapes(psi)
        return ((a[:, None] + counts) / (self.concentration + tokens) * post).sum(0)
