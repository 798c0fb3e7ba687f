"""Minimax-optimal stochastic zeroth-order minimisation of strongly convex functions.

Qian Yu, Yining Wang, Baihe Huang, Qi Lei & Jason D. Lee, "Stochastic Zeroth-Order Optimization
under Strongly Convexity and Lipschitz Hessian: Minimax Sample Complexity", NeurIPS 2024
(arXiv 2406.19617).

Setting: the algorithm queries points ``x`` and observes ``f(x) + w`` with zero-mean noise of
variance at most 1; ``f`` is ``M``-strongly convex and its Hessian is ``rho``-Lipschitz in
Frobenius norm.  The simple regret after ``T`` queries is ``Theta(d rho^(2/3) M^-1 T^(-2/3))``
(Theorems 3.1 and 3.2), reached by the paper's Algorithm 4, implemented by :func:`two_stage`:

1. *bootstrapping*: ``floor(T^0.1)`` Newton steps from coordinate-wise central differences
   (:func:`bootstrapping_estimate`, ``n_m = floor(T^0.9 / (10 d))`` repeats at radius
   ``r_m = (8 / (n_m rho^2))^(1/6)``) and a second-difference Hessian
   (:func:`hessian_estimate`, ``n_H = floor(T^0.9 / (10 d^2))`` repeats at radius
   ``r_H = (144 / (n_H rho^2))^(1/6)``, eigenvalues floored at ``M``), the Hessian's eigenvalues
   floored further at the smallest ``m*`` that keeps the step within ``M / rho``;
2. *final step*: a Hessian at ``n_H = floor(T / (10 d^2))``, the ellipsoid
   ``Z = r_g Z_H / lambda_max(Z_H)`` with ``Z_H = H^(-1/2)`` and
   ``r_g = (d^3 / (n_g rho^2))^(1/6)``, the spherical two-point estimate of ``Z grad f`` on it
   (:func:`gradient_estimate`, ``n_g = floor(T / 10)`` pairs), and the Newton-like step
   ``-H^-1 Z^-1 g`` clipped to ``M / rho``.

Every algorithm here is a *query generator*: it yields a ``[q, d]`` float64 tensor of points
and is sent back the ``[q]`` noisy values observed there, then returns its answer.  That lets
one implementation serve a simulated oracle (:func:`drive`), and a federated server that asks
clients for losses over several rounds (:mod:`fedleak.server.zo_newton`).  All randomness comes
from an explicit ``torch.Generator``.

Departures from the paper.  Noise of standard deviation ``noise_std`` other than 1 is handled
by working on ``f / noise_std`` (so ``rho`` and ``M`` are divided by it), the paper's
normalisation.  The paper leaves the stage-2 Hessian radius implicit; stage 1's formula
``(144 / (n_H rho^2))^(1/6)`` is used with stage 2's ``n_H``.  Our second-difference Hessian
takes four queries per entry ``i <= j`` and repeat, ``2 n_H d (d + 1)`` in all, so the total can
exceed the paper's ``4T/5`` for small ``d``; :func:`drive` returns the queries actually used and
the regret benchmark plots against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

Queries = Generator[Tensor, Tensor, Tensor]  # yields points [q, d], is sent values [q]
Oracle = Callable[[Tensor], Tensor]  # points [q, d] -> noisy values [q]

DTYPE = torch.float64


def drive(algorithm: Queries, oracle: Oracle) -> tuple[Tensor, int]:
    """Run a query generator against ``oracle``; return its answer and the queries it made."""
    used = 0
    try:
        points = next(algorithm)
        while True:
            values = oracle(points)
            if values.shape != points.shape[:1]:
                raise ValueError(
                    f"the oracle returned values of shape {tuple(values.shape)} for "
                    f"{len(points)} points; return one value per point"
                )
            used += len(points)
            points = algorithm.send(values.to(DTYPE))
    except StopIteration as done:
        return done.value, used


def sphere(n: int, dim: int, rng: torch.Generator) -> Tensor:
    """``n`` directions drawn uniformly on the unit sphere of ``R^dim``, ``[n, dim]``."""
    u = torch.randn(n, dim, generator=rng, dtype=DTYPE)
    return u / u.norm(dim=1, keepdim=True)


def two_point(directions: Tensor, plus: Tensor, minus: Tensor) -> Tensor:
    """The spherical two-point estimate ``mean_j (d/2) (y+_j - y-_j) u_j`` of ``Z grad f``.

    ``directions`` ``[n, d]`` are the unit ``u_j`` and ``plus``/``minus`` ``[n]`` the values at
    ``x +- Z u_j``: whoever knows the directions turns the scalars into a gradient this way.
    """
    dim = directions.shape[1]
    return (dim / 2) * ((plus - minus)[:, None] * directions).mean(0)


def gradient_estimate(x: Tensor, z: Tensor, n: int, rng: torch.Generator) -> Queries:
    """GradientEst(x, Z, n) (Theorem 4.1): estimates ``Z grad f(x)`` from ``2n`` queries."""
    u = sphere(n, len(x), rng)
    steps = u @ z.T  # Z u_j as rows
    values = yield torch.cat([x + steps, x - steps])
    return two_point(u, values[:n], values[n:])


def bootstrapping_estimate(x: Tensor, radius: float, n: int) -> Queries:
    """BootstrappingEst: central differences along each axis at ``radius``, ``n`` repeats."""
    dim = len(x)
    axes = radius * torch.eye(dim, dtype=DTYPE)
    plus = (x + axes).repeat(n, 1)
    values = yield torch.cat([plus, (x - axes).repeat(n, 1)])
    diff = (values[: n * dim] - values[n * dim :]).view(n, dim).mean(0)
    return diff / (2 * radius)


def hessian_estimate(x: Tensor, radius: float, n: int, floor: float) -> Queries:
    """HessianEst: symmetric second differences, eigenvalues floored at ``floor``.

    Entry ``(i, j)``, ``i <= j``, is ``(f(x+re_i+re_j) - f(x+re_i-re_j) - f(x-re_i+re_j) +
    f(x-re_i-re_j)) / (4 r^2)`` averaged over ``n`` repeats (the diagonal is the same formula
    with ``i = j``: a second difference at step ``2r``).
    """
    dim = len(x)
    i, j = torch.triu_indices(dim, dim)
    e = radius * torch.eye(dim, dtype=DTYPE)
    corners = [x + e[i] + e[j], x + e[i] - e[j], x - e[i] + e[j], x - e[i] - e[j]]
    pairs = len(i)
    values = yield torch.cat([c.repeat(n, 1) for c in corners])
    pp, pm, mp, mm = values.view(4, n, pairs).mean(1)
    entries = (pp - pm - mp + mm) / (4 * radius**2)
    hessian = torch.zeros(dim, dim, dtype=DTYPE)
    hessian[i, j] = entries
    hessian[j, i] = entries
    return floored(hessian, floor)


def floored(matrix: Tensor, floor: float) -> Tensor:
    """The symmetric ``matrix`` with its eigenvalues raised to at least ``floor``."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=floor)) @ vectors.T


def newton_step(hessian: Tensor, gradient: Tensor, bound: float) -> Tensor:
    """``-H_m^-1 g`` for the smallest eigenvalue floor ``m`` keeping its norm within ``bound``.

    ``H_m`` is ``hessian`` with its eigenvalues floored at ``m``; the step's norm decreases as
    ``m`` grows, so ``m*`` is found by bisection between the smallest eigenvalue and
    ``|g| / bound`` (where the norm is at most ``bound`` whatever the eigenvalues).
    """
    values, vectors = torch.linalg.eigh(hessian)
    c = vectors.T @ gradient

    def norm(m: float) -> float:
        return float((c / values.clamp(min=m)).norm())

    low, high = float(values.min()), max(float(c.norm()) / bound, float(values.min()))
    if norm(low) > bound:
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if norm(mid) > bound else (low, mid)
        low = high
    return -vectors @ (c / values.clamp(min=low))


@dataclass(frozen=True)
class Plan:
    """The sample sizes and radii of Algorithm 4 for a budget of ``budget`` queries in ``dim``."""

    budget: int
    dim: int
    rho: float  # Hessian Lipschitz constant, of f / noise_std
    strong_convexity: float  # M, of f / noise_std

    @property
    def iterations(self) -> int:
        """Bootstrapping Newton steps, ``floor(T^0.1)``."""
        return math.floor(self.budget**0.1)

    @property
    def n_m(self) -> int:
        """Stage-1 repeats of the central differences."""
        return math.floor(self.budget**0.9 / (10 * self.dim))

    @property
    def n_h1(self) -> int:
        """Stage-1 repeats of the Hessian's second differences."""
        return math.floor(self.budget**0.9 / (10 * self.dim**2))

    @property
    def n_g(self) -> int:
        """Stage-2 direction pairs of the gradient estimate."""
        return math.floor(self.budget / 10)

    @property
    def n_h2(self) -> int:
        """Stage-2 repeats of the Hessian's second differences."""
        return math.floor(self.budget / (10 * self.dim**2))

    def hessian_radius(self, n: int) -> float:
        """The second differences' radius for ``n`` repeats."""
        return (144 / (n * self.rho**2)) ** (1 / 6)

    @property
    def r_m(self) -> float:
        """The central differences' radius."""
        return (8 / (self.n_m * self.rho**2)) ** (1 / 6)

    @property
    def r_g(self) -> float:
        """The ellipsoid's largest semi-axis."""
        return (self.dim**3 / (self.n_g * self.rho**2)) ** (1 / 6)

    @property
    def queries(self) -> int:
        """Queries the whole algorithm makes (see the module's note on the Hessian's cost)."""
        hessian = 2 * self.dim * (self.dim + 1)
        stage1 = self.iterations * (2 * self.dim * self.n_m + hessian * self.n_h1)
        return stage1 + hessian * self.n_h2 + 2 * self.n_g


def plan(budget: int, dim: int, rho: float, strong_convexity: float, noise_std: float = 1.0):
    """Algorithm 4's :class:`Plan`, or a ``ValueError`` naming the smallest budget that works."""
    if dim < 1:
        raise ValueError(f"two_stage: the dimension must be >= 1, got {dim}")
    if not rho > 0 or not strong_convexity > 0 or not noise_std > 0:
        raise ValueError(
            f"two_stage: rho, strong_convexity and noise_std must be > 0, got {rho}, "
            f"{strong_convexity} and {noise_std}"
        )
    made = Plan(int(budget), dim, rho / noise_std, strong_convexity / noise_std)
    # the binding sample size is the stage-1 Hessian's, n_H = floor(T^0.9 / (10 d^2)) >= 1
    needed = math.ceil((10 * dim**2) ** (1 / 0.9))
    if made.n_h1 < 1:
        while Plan(needed, dim, 1, 1).n_h1 < 1:
            needed += 1
        raise ValueError(
            f"two_stage: a budget of {budget} queries is too small in dimension {dim} "
            f"(Algorithm 4 needs floor(T^0.9 / (10 d^2)) >= 1); use a budget of at least {needed}"
        )
    return made


def two_stage(
    x0: Tensor,
    budget: int,
    *,
    rho: float,
    strong_convexity: float,
    rng: torch.Generator,
    noise_std: float = 1.0,
) -> Queries:
    """Algorithm 4 of Yu et al. from ``x0`` with ``budget`` (T) queries; returns the final point.

    ``rho`` and ``strong_convexity`` (M) are the function's constants and ``noise_std`` the
    standard deviation of its evaluations; the algorithm needs them, as in the paper.
    """
    p = plan(budget, len(x0), rho, strong_convexity, noise_std)
    x = x0.detach().to(DTYPE).clone()
    bound = p.strong_convexity / p.rho  # the trust radius M / rho
    scale = 1.0 / noise_std

    def scaled(algorithm: Queries) -> Queries:  # the estimators see f / noise_std
        points = next(algorithm)
        try:
            while True:
                values = yield points
                points = algorithm.send(values * scale)
        except StopIteration as done:
            return done.value

    for _ in range(p.iterations):
        m = yield from scaled(bootstrapping_estimate(x, p.r_m, p.n_m))
        radius = p.hessian_radius(p.n_h1)
        h = yield from scaled(hessian_estimate(x, radius, p.n_h1, p.strong_convexity))
        x = x + newton_step(h, m, bound)
    radius = p.hessian_radius(p.n_h2)
    h = yield from scaled(hessian_estimate(x, radius, p.n_h2, p.strong_convexity))
    values, vectors = torch.linalg.eigh(h)
    z_h = (vectors * values.rsqrt()) @ vectors.T  # H^(-1/2)
    z = p.r_g * z_h / float(values.rsqrt().max())
    g = yield from scaled(gradient_estimate(x, z, p.n_g, rng))
    step = -torch.linalg.solve(h, torch.linalg.solve(z, g))
    if (norm := float(step.norm())) > bound:
        step = step * (bound / norm)
    return x + step


def zo_sgd(
    x0: Tensor, budget: int, *, strong_convexity: float, rng: torch.Generator, radius: float = 1.0
) -> Queries:
    """Two-point spherical ZO-SGD: the baseline of the regret benchmark.

    ``budget / 2`` iterations; at iteration ``t`` the estimate
    ``(d / (2 delta_t)) (f(x + delta_t u) - f(x - delta_t u)) u`` with ``delta_t = radius
    t^(-1/6)`` (the bias-variance balance for a Lipschitz Hessian) and the step ``1 / (M t)``;
    returns the last iterate.
    """
    if budget < 2:
        raise ValueError(f"zo_sgd: the budget must be >= 2 queries (one pair), got {budget}")
    if not strong_convexity > 0 or not radius > 0:
        raise ValueError(
            f"zo_sgd: strong_convexity and radius must be > 0, got {strong_convexity} and {radius}"
        )
    x = x0.detach().to(DTYPE).clone()
    for t in range(1, budget // 2 + 1):
        delta = radius * t ** (-1 / 6)
        u = sphere(1, len(x), rng)
        values = yield torch.cat([x + delta * u, x - delta * u])
        g = two_point(u, values[:1], values[1:]) / delta
        x = x - g / (strong_convexity * t)
    return x


@dataclass(frozen=True)
class LogCoshQuadratic:
    """``f(x) = x^T A x / 2 + sum_j log cosh(b_j^T x - t_j)``: strongly convex, Lipschitz Hessian.

    ``M`` is ``A``'s smallest eigenvalue (log cosh is convex), and since
    ``|d/ds sech^2 s| <= 4 / (3 sqrt 3)`` the Hessian is ``rho``-Lipschitz in Frobenius norm with
    ``rho = 4 / (3 sqrt 3) sum_j |b_j|^3``.
    """

    a: Tensor  # [d, d] symmetric positive definite
    b: Tensor  # [k, d]
    t: Tensor  # [k]

    @property
    def strong_convexity(self) -> float:
        """M: the smallest eigenvalue of ``A``."""
        return float(torch.linalg.eigvalsh(self.a).min())

    @property
    def rho(self) -> float:
        """The Hessian's Lipschitz constant (Frobenius norm)."""
        return 4 / (3 * math.sqrt(3)) * float(self.b.norm(dim=1).pow(3).sum())

    def __call__(self, x: Tensor) -> Tensor:
        """Noise-free values at the rows of ``x`` ``[q, d]``."""
        s = x @ self.b.T - self.t
        # log cosh s = |s| + log1p(exp(-2|s|)) - log 2, stable for large |s|
        logcosh = s.abs() + torch.log1p(torch.exp(-2 * s.abs())) - math.log(2)
        return 0.5 * ((x @ self.a) * x).sum(1) + logcosh.sum(1)

    def minimum(self) -> tuple[Tensor, float]:
        """The minimiser and minimum, by Newton's method to machine precision."""
        x = torch.zeros(self.a.shape[0], dtype=DTYPE)
        for _ in range(100):
            s = self.b @ x - self.t
            grad = self.a @ x + self.b.T @ torch.tanh(s)
            hess = self.a + (self.b.T * torch.cosh(s).pow(-2)) @ self.b
            step = torch.linalg.solve(hess, grad)
            x = x - step
            if float(step.norm()) < 1e-15:
                break
        return x, float(self(x[None])[0])


def logcosh_problem(
    dim: int, rng: torch.Generator, *, eigenvalues: tuple[float, float] = (1.0, 4.0), rho=1.0
) -> LogCoshQuadratic:
    """A random :class:`LogCoshQuadratic` in ``dim`` dimensions with ``M`` and ``rho`` fixed.

    ``A`` has eigenvalues evenly spread over ``eigenvalues`` in a random basis (so ``M`` is
    the lower end); ``2 dim`` log-cosh terms with random directions, scaled so that the
    Hessian's Lipschitz constant is exactly ``rho`` whatever ``dim`` (only ``d`` then varies in
    the regret bound), and offsets ``t_j ~ N(0, 1)`` so the minimiser is away from 0.
    """
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=rng, dtype=DTYPE))
    spread = torch.linspace(*eigenvalues, dim, dtype=DTYPE)
    a = (q * spread) @ q.T
    b = torch.randn(2 * dim, dim, generator=rng, dtype=DTYPE)
    b = b * (rho / (4 / (3 * math.sqrt(3)) * float(b.norm(dim=1).pow(3).sum()))) ** (1 / 3)
    t = torch.randn(2 * dim, generator=rng, dtype=DTYPE)
    return LogCoshQuadratic((a + a.T) / 2, b, t)


def noisy(f: Callable[[Tensor], Tensor], std: float, rng: torch.Generator) -> Oracle:
    """``f`` observed with independent ``N(0, std^2)`` noise on every query."""
    return lambda x: f(x) + std * torch.randn(len(x), generator=rng, dtype=DTYPE)
