"""Feature directions of a batch from one gradient of a Gaussian two-layer head (tensor method).

The tensor method of Wang, Lee & Lei ("Reconstructing Training Data from Model Gradient,
Provably", AISTATS 2023), a building block, not an attack of its own.

Threat model: a malicious server (or one that chose the architecture) sends a head
``h(z) = Σ_j a_j σ(ξ_jᵀ z)`` whose ``m`` first-layer rows ``ξ_j ~ N(0, I_d)`` it drew itself and
keeps (first-layer bias zero), and receives one FedSGD gradient of a batch of ``B`` features
``z_i`` (the head's inputs).  Nothing about the batch is known: only ``ξ`` and the gradient.
Shared by the vision feature-reconstruction attack (Liu, Wang, Chen & Lei, AISTATS 2025) and the
text pooler attack (Li, Liu & Lei); see ``notes/vision-attacks-and-defenses.md`` §2.4 and
``notes/text-attacks.md`` §1.4.

The gradient gives two per-unit statistics (``β_i``, ``r_i``: per-example loss residuals, unknown):

* first layer, row ``j`` of ``∂L/∂W1``:  ``G_j = Σ_i β_i σ'(ξ_jᵀz_i) z_i``.  ``β_i = a_jᵀ r_i``
  must not depend on ``j``: the output weights are shared by the units, or the caller multiplies
  each row by its known weight ``a_jc`` for a class ``c`` first (independent of ``ξ``, so the
  moments below then weight example ``i`` by ``E[a_c aᵀ] r_i``);
* second layer, ``∂L/∂a_jc`` for one output unit ``c``:  ``g_j = Σ_i r_ic σ(ξ_jᵀz_i)``.

Several weightings of either (``[k, m, d]`` / ``[k, m]``, e.g. one per class) share the
components and are fitted jointly.  Stein's identity ``E_ξ[f(ξᵀz) He_k(ξ)] = E[f⁽ᵏ⁾(ξᵀz)]
z^{⊗k}`` (``He_k`` the Hermite tensor) turns averages over the units into symmetric moments of
rank ``B`` whose components are the features:

* order ``n``, first layer:   ``(1/m) Σ_j sym(G_j ⊗ He_{n-1}(ξ_j)) ≈ Σ_i β_i c_n(z_i) z_i^{⊗n}``
* order ``n``, second layer:  ``(1/m) Σ_j g_j He_n(ξ_j)            ≈ Σ_i r_ic c_n(z_i) z_i^{⊗n}``

with ``c_n(z) = E[σ⁽ⁿ⁾(ξᵀz)]``, zero for some activations and orders (:data:`NONZERO`): an odd σ
(tanh) kills the even orders, ``x³ + x²`` has ``σ'''' ≡ 0``, and ReLU has ``E[δ'] = 0`` at order
3.  Each moment's error is ``O(√(d/m))``, hence widths of ~10⁴.  Before any moment, ``G`` and
``g`` lose their low-degree Hermite components (the mean; for ``g`` also the linear part, and
for orders >= 3 the quadratic part): orthogonal to the ``He_k`` used, they carry most of the
noise (:func:`_reduced`).

Algorithm (no ``d³`` or ``d⁴`` array is ever built; every full-dimensional step is a product of
the ``[m, d]`` blocks with a ``d x d`` matrix or a few vectors):

1. **Subspace** of the ``B`` features: ``"matrix"``, the top-``B`` eigenvectors (by
   |eigenvalue|) of the order-2 moment, wherever its coefficient is non-zero; ``"tensor"``
   (tanh, or on request), the range of contractions ``T(I, u, ..., u)`` of the order-``n``
   moment with random ``u``, refined by power iterations with ``u`` inside the current basis.
2. **Projected moment**: the ``B^n`` tensor in that orthonormal basis (the Hermite tensor of a
   projected standard Gaussian is the Hermite tensor of the projection).
3. **Non-orthogonal CP**: Jennrich's simultaneous diagonalisation of two random contractions
   ``T(I, I, w, ...)`` (of one source, or of random mixtures of them), several times; the
   best-fitting candidates are refined by least squares with the weights solved in closed form
   (variable projection, L-BFGS), each source's moment divided by its estimated noise.

What works best depends on the activation *and* on the scale of the pre-activations ``ξᵀz``
(see the table in :mod:`fedleak.modifiers.gaussian_head`).  The defaults (:data:`ORDER`, the
matrix subspace wherever it exists) measured best or near-best at pre-activation standard
deviations 1 and 6 (tests/attacks/test_tensor.py), except for ``x³ + x²`` with large
pre-activations (std ~6, e.g. unscaled ξ on BERT features): pass ``subspace="tensor"`` there.

Only directions are identifiable: scale, sign and order are not.  All randomness comes from the
``rng`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "selu": nn.functional.selu,
    "tanh": torch.tanh,
    "x3x2": lambda t: t**3 + t**2,
}
# Moment orders n (2, 3, 4) whose Hermite coefficient E[σ⁽ⁿ⁾(ξᵀz)] is non-zero.
NONZERO: dict[str, frozenset[int]] = {
    "relu": frozenset({2, 4}),  # σ'' = δ, σ''' = δ' (mean φ'(0) = 0), σ'''' = δ''
    "selu": frozenset({2, 3, 4}),  # exponential for t < 0 plus a kink at 0: all survive
    "tanh": frozenset({3}),  # odd: σ'' and σ'''' are odd, so their Gaussian means vanish
    "x3x2": frozenset({2, 3}),  # σ'' = 6t + 2, σ''' = 6, σ'''' ≡ 0
}
# The CP order by default: the usable one, or for SELU the robust one.  Order 4 (the official
# code's) is a little better with large pre-activations (std 6: mean |cos| 0.998 / 0.944 at
# B = 4 / 8, against 0.992 / 0.891 at order 3) but collapses with small ones (std 1: 0.786 /
# 0.654, against 0.998 / 0.973); d = 100, see the table in tests/attacks/test_tensor.py.
ORDER: dict[str, int] = {"relu": 4, "selu": 3, "tanh": 3, "x3x2": 3}
SUBSPACES = ("matrix", "tensor")

_CHUNK = 1 << 22  # entries of one chunk's Hermite tensors: bounds memory at ~32 MB (float64)
_PROBES = 4  # random probes per feature in the tensor subspace sketch (plus 8)
_POWER = 3  # power iterations of the tensor subspace
_TRIALS = 8  # Jennrich contraction pairs
_REFINED = 3  # of which the best-fitting are refined


@dataclass(frozen=True)
class FeatureRecovery:
    """Recovered feature directions of a batch, and how much to trust them."""

    directions: Tensor  # [count, d], unit norm; sign and order carry no meaning
    weights: Tensor  # [count] CP weights λ_i of the moment used: ≈ β_i c_n(z_i) ‖z_i‖ⁿ
    confidence: float  # 1 - relative residual of the rank-count CP fit of the projected moment
    eigengap: float  # subspace step's spectrum: value_count / value_count+1 (inf if count = d)
    order: int  # moment order of the CP step
    subspace: str  # "matrix" or "tensor"


def recover_features(
    xi: Tensor,
    count: int,
    *,
    first: Tensor | None = None,
    second: Tensor | None = None,
    activation: str,
    rng: torch.Generator,
    order: int = 0,
    subspace: str = "auto",
) -> FeatureRecovery:
    """Recover ``count`` feature directions from the gradient of a Gaussian two-layer head.

    Args:
        xi: the first layer's known rows ``ξ_j ~ N(0, I_d)``, ``[m, d]``.  If the layer holds
            ``s·ξ``, pass ``ξ`` and the gradient of the layer as it is: a scale only changes the
            effective activation ``t ↦ σ(s t)``, and the method never evaluates σ.
        count: features to recover (the batch size ``B``), ``1 <= count <= d``.
        first: the first layer's weight gradient ``∂L/∂W1``, ``[m, d]`` (rows ``G_j``), or ``k``
            weightings of it ``[k, m, d]``.
        second: one output unit's weight gradient over the hidden units, ``[m]``, or ``[k, m]``.
            At least one of ``first`` and ``second``; all moments share the components.
        activation: the head's activation, one of :data:`ACTIVATIONS`.
        rng: the only source of randomness (the probes and Jennrich contractions).
        order: the CP moment order, 3 or 4 (its coefficient must be non-zero, see
            :data:`NONZERO`); 0 = :data:`ORDER` of the activation.
        subspace: ``"matrix"`` (needs a non-zero order 2), ``"tensor"``, or ``"auto"``: the
            matrix wherever it exists.

    Returns:
        The directions ordered by |weight|, the CP weights of the first moment given (``first``
        if passed, its first weighting), the CP fit as ``confidence``, and diagnostics.
    """
    moments = _Moments.checked(xi, first, second, count, activation)
    order = order or ORDER[activation]
    if order not in (3, 4) or order not in NONZERO[activation]:
        usable = [n for n in (3, 4) if n in NONZERO[activation]]
        raise ValueError(
            f"recover_features: order {order} is not usable with {activation!r} (its Hermite "
            f"coefficient is zero, or it is not 3 or 4); use order = {usable[0]}, or 0"
        )
    valid = [s for s in SUBSPACES if s == "tensor" or 2 in NONZERO[activation]]
    if subspace not in ("auto", *valid):
        raise ValueError(
            f"recover_features: subspace {subspace!r} is not usable with {activation!r}; use "
            f"one of {', '.join(repr(s) for s in ('auto', *valid))}"
        )
    subspace = valid[0] if subspace == "auto" else subspace

    higher = moments.higher()
    if subspace == "matrix":
        basis, gap = moments.eigenspace(count)
    else:
        basis, gap = higher.sketch(count, order, rng)
    tensors, noises = zip(*(higher.projected(s, order, basis) for s in higher.sources), strict=True)
    components, weights, fit = _cp(list(tensors), list(noises), order, count, rng)
    directions = basis @ components
    directions = directions / directions.norm(dim=0, keepdim=True)
    # Canonical sign (positive coordinate sum) and order (by |weight|), so equal inputs give
    # equal outputs; with an odd order the weight changes sign with its direction.
    sign = torch.where(directions.sum(0) < 0, -1.0, 1.0).to(directions.dtype)
    directions, weights = directions * sign, weights * sign**order
    ranked = weights.abs().argsort(descending=True)
    return FeatureRecovery(
        directions=directions[:, ranked].T.contiguous().to(xi.dtype),
        weights=weights[ranked].to(xi.dtype),
        confidence=fit,
        eigengap=gap,
        order=order,
        subspace=subspace,
    )


@dataclass(frozen=True)
class _Source:
    """One gradient statistic: ``first`` rows ``G_j`` ``[m, d]`` or ``second`` entries ``[m]``."""

    kind: str
    data: Tensor


def _reduced(xi: Tensor, source: _Source) -> _Source:
    """The source minus its low-degree Hermite components: a variance reduction.

    ``E[f(ξ) He_k(ξ)] = 0`` for a polynomial ``f`` of degree ``< k``, so subtracting ``G``'s
    mean (degree 0; every moment of ``G`` uses ``k >= 1``) and ``g``'s mean and linear part
    (degree <= 1; ``g``'s moments use ``k >= 2``) leaves every moment's expectation as it was
    and removes their largest noise: ``σ`` and ``σ'`` are far from mean-zero.  Measured mean
    |cos| over seeds 0-4, SELU, d = 100: B = 4 from ``G`` 0.85-1.00 -> 0.97-1.00; B = 2 from
    ``g`` 0.64-0.95 -> 0.94-0.99.
    """
    data = source.data
    if source.kind == "first":
        return _Source("first", data - data.mean(0))
    linear = xi.T @ data / len(data)  # (1/m) Σ_j g_j ξ_j
    return _Source("second", data - data.mean() - xi @ linear)


class _Moments:
    """The empirical Hermite moments of one gradient, used only through contractions."""

    def __init__(self, xi: Tensor, sources: list[_Source]) -> None:
        self.xi, self.sources, self.m = xi, sources, xi.shape[0]
        self._matrices: dict[int, Tensor] = {}  # order-2 moments by id(source): m d² each

    @classmethod
    def checked(
        cls, xi: Tensor, first: Tensor | None, second: Tensor | None, count: int, activation: str
    ) -> _Moments:
        """Validate the arguments of :func:`recover_features`; cast to float32 at least."""
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"recover_features: unknown activation {activation!r}; "
                f"use one of {', '.join(sorted(ACTIVATIONS))}"
            )
        if xi.ndim != 2 or xi.shape[0] < 2:
            raise ValueError(f"recover_features: xi must be [m >= 2, d], got {tuple(xi.shape)}")
        m, d = xi.shape
        if not 1 <= count <= d:
            raise ValueError(f"recover_features: count must be in 1..d = {d}, got {count}")
        if first is None and second is None:
            raise ValueError("recover_features: pass first (∂L/∂W1), second (∂L/∂a), or both")
        if first is not None and (first.ndim not in (2, 3) or first.shape[-2:] != xi.shape):
            raise ValueError(
                f"recover_features: first must be [{m}, {d}] like xi, or [k, {m}, {d}], "
                f"got {tuple(first.shape)}"
            )
        if second is not None and (second.ndim not in (1, 2) or second.shape[-1:] != (m,)):
            raise ValueError(
                f"recover_features: second must be [{m}] or [k, {m}], got {tuple(second.shape)}"
            )
        # float32 is enough for the [m, d] products (their statistical error is ~1/√m); the
        # small B-dimensional work is done in float64.
        dtype = torch.promote_types(xi.dtype, torch.float32)
        sources = [
            _Source(kind, data.detach().to(dtype))
            for kind, given, single in (("first", first, 2), ("second", second, 1))
            if given is not None
            for data in (given[None] if given.ndim == single else given)
        ]
        xi = xi.detach().to(dtype)
        return cls(xi, [_reduced(xi, source) for source in sources])

    def higher(self) -> _Moments:
        """For moments of order 3 and 4: ``g`` minus its degree-2 Hermite component too.

        That component is orthogonal to ``He_3`` and ``He_4``, so the moments keep their
        expectation and lose its noise (measured: B = 2, 0.94 -> 0.98 mean |cos| from ``g``
        alone).  The same for ``G``'s degree-1 component measured no gain, so ``G`` is kept.
        """
        reduced = []
        for source in self.sources:
            if source.kind == "second":
                quadratic = self.matrix(source).to(self.xi.dtype)  # (1/m) Σ_j g_j He_2(ξ_j)
                part = ((self.xi @ quadratic) * self.xi).sum(1) - quadratic.trace()
                source = _Source("second", source.data - part / 2)  # ½ ⟨M, He_2(ξ_j)⟩
            reduced.append(source)
        return _Moments(self.xi, reduced)

    def matrix(self, source: _Source) -> Tensor:
        """The order-2 moment ``[d, d]``, symmetric: one ``[d, m] x [m, d]`` product."""
        if id(source) not in self._matrices:
            xi = self.xi
            if source.kind == "first":
                cross = source.data.T @ xi / self.m  # (1/m) Σ_j G_j ξ_jᵀ
                matrix = ((cross + cross.T) / 2).double()
            else:
                g = source.data  # (1/m) Σ_j g_j (ξ_j ξ_jᵀ - I)
                matrix = ((xi * g[:, None]).T @ xi / self.m).double()
                matrix -= float(g.mean()) * torch.eye(
                    xi.shape[1], dtype=torch.float64, device=xi.device
                )
            self._matrices[id(source)] = matrix
        return self._matrices[id(source)]

    def matrix_noise(self, source: _Source) -> float:
        """The order-2 moment's noise, ``‖M - E M‖_F``, estimated from its per-unit terms.

        ``M`` is a mean of ``m`` i.i.d. terms ``X_j``, so ``E‖M - E M‖² ≈ Σ_j ‖X_j‖² / m²``.
        """
        xi, data = self.xi, source.data
        norms = xi.pow(2).sum(1)
        if source.kind == "first":  # ‖sym(G ξᵀ)‖² = (‖G‖² ‖ξ‖² + (G·ξ)²) / 2
            terms = (data.pow(2).sum(1) * norms + (data * xi).sum(1) ** 2) / 2
        else:  # ‖g (ξξᵀ - I)‖² = g² (‖ξ‖⁴ - 2‖ξ‖² + d)
            terms = data.pow(2) * (norms**2 - 2 * norms + xi.shape[1])
        return float(terms.double().sum().sqrt()) / self.m

    def eigenspace(self, count: int) -> tuple[Tensor, float]:
        """Top-``count`` eigenvectors of the order-2 moment(s) by |eigenvalue|, and the gap.

        With several sources, the union of their ranges: the top eigenvectors of the sum of
        their squares, each divided by its estimated noise (their scales are unrelated, and a
        noisier source should count less).
        """
        square = sum(
            (mat @ mat) / self.matrix_noise(source) ** 2
            for source, mat in zip(self.sources, map(self.matrix, self.sources), strict=True)
        )
        values, vectors = torch.linalg.eigh(square)  # ascending; square is PSD
        values = values.flip(0).clamp_min(0).sqrt()
        return vectors.flip(1)[:, :count].contiguous(), _gap(values, count)

    def sketch(self, count: int, order: int, rng: torch.Generator) -> tuple[Tensor, float]:
        """An orthonormal basis of the order-``order`` moment's range, and its gap.

        ``T(I, u, ..., u) = Σ_i λ_i (u·z_i)^{n-1} z_i`` lies in the features' span for any
        ``u``: the range of many random probes gives the span (the gap is measured here, with
        probes from the whole space), then power iterations with probes inside the current
        basis concentrate them on the features.
        """
        d, probes = self.xi.shape[1], _PROBES * count + 8
        probe = torch.randn(d, probes, generator=rng, dtype=torch.float64).to(self.xi.device)
        image = self._image(order, probe)
        left, values, _ = torch.linalg.svd(image, full_matrices=False)
        gap = _gap(values, count)
        for _ in range(_POWER):
            mix = torch.randn(count, probes, generator=rng, dtype=torch.float64).to(left.device)
            left = torch.linalg.svd(self._image(order, left[:, :count] @ mix), full_matrices=False)
            left = left.U
        return left[:, :count].contiguous(), gap

    def _image(self, order: int, probes: Tensor) -> Tensor:
        """Contractions of every source at ``probes``, side by side, each normalised."""
        images = [self.contract(s, order, probes) for s in self.sources]
        return torch.cat([y / y.norm().clamp_min(1e-300) for y in images], dim=1)

    def contract(self, source: _Source, order: int, z: Tensor) -> Tensor:
        """``T(I, z, ..., z)`` of the order-``order`` moment for each column of ``z`` ``[d, k]``.

        For a unit ``ẑ`` and ``t = ξᵀẑ``: ``He_k(ξ)(I, ẑ, ..., ẑ) = He_k(t) ẑ + He_{k-1}(t)
        (ξ - t ẑ)``, with the scalar (probabilists') Hermite polynomials, so a contraction costs
        a few ``[m, d] x [d, k]`` products.  Returns ``[d, k]``, float64.
        """
        norms = z.norm(dim=0)
        unit = (z / norms.clamp_min(1e-300)).to(self.xi.dtype)  # a zero column contracts to 0
        t = self.xi @ unit  # [m, k]
        if source.kind == "second":
            weight = source.data[:, None]
            along = _hermite1d(t, order) * weight
            across = _hermite1d(t, order - 1) * weight
            # (1/m) Σ_j g_j [He_n(t_j) ẑ + He_{n-1}(t_j) (ξ_j - t_j ẑ)]
            out = unit * (along - across * t).sum(0) + self.xi.T @ across
        else:
            k, g = order - 1, source.data
            gz = g @ unit  # [m, k]: G_j · ẑ
            full, partial = _hermite1d(t, k), _hermite1d(t, k - 1)
            # sym(G ⊗ He_k) contracted in n - 1 modes: the free mode is G's once (He_k fully
            # contracted) and one of He_k's n - 1 times (G contracted with ẑ).
            free_g = g.T @ full
            free_he = unit * (gz * (full - partial * t)).sum(0) + self.xi.T @ (gz * partial)
            out = (free_g + (order - 1) * free_he) / order
        return (out / self.m).double() * norms ** (order - 1)

    def projected(self, source: _Source, order: int, basis: Tensor) -> Tensor:
        """The order-``order`` moment in the orthonormal ``basis`` ``[d, B]``: ``[B] * order``."""
        b = basis.shape[1]
        p = self.xi @ basis.to(self.xi.dtype)  # [m, B]: ξ_j in the basis, ~ N(0, I_B)
        data = source.data
        q = data @ basis.to(self.xi.dtype) if source.kind == "first" else None
        k = order if source.kind == "second" else order - 1
        total = torch.zeros((b,) * order, dtype=torch.float64, device=p.device)
        energy = 0.0  # Σ_j ‖term_j‖²: the noise estimate, as for the matrix
        step = max(1, _CHUNK // b**k)
        for start in range(0, self.m, step):  # chunks of units bound the [c, B^k] tensors
            he = _hermite(p[start : start + step].double(), k)
            size = he.pow(2).flatten(1).sum(1) if k else he.pow(2)
            if source.kind == "second":
                weight = data[start : start + step].double()
                total += torch.einsum("j,j...->...", weight, he)
                energy += float((weight.pow(2) * size).sum())
            else:
                rows = q[start : start + step].double()
                total += torch.einsum("ja,j...->a...", rows, he)
                energy += float((rows.pow(2).sum(1) * size).sum())
        total /= self.m
        noise = math.sqrt(energy) / self.m
        if source.kind == "first":  # symmetrise: He_k is symmetric, so moving G's mode suffices
            total = sum(torch.movedim(total, 0, i) for i in range(order)) / order
            noise /= math.sqrt(order)  # averaging n placements of the noise, roughly
        return total, noise


def _hermite1d(t: Tensor, k: int) -> Tensor:
    """The probabilists' Hermite polynomial ``He_k(t)``: ``He_{k+1} = t He_k - k He_{k-1}``."""
    previous, current = torch.ones_like(t), t
    if k == 0:
        return previous
    for i in range(1, k):
        previous, current = current, t * current - i * previous
    return current


def _hermite(p: Tensor, k: int) -> Tensor:
    """The Hermite tensors ``He_k(p_j)`` of the rows of ``p`` ``[c, B]``: ``[c, B, ..., B]``.

    Recursion: ``He_{k+1}(p)_{a,I} = p_a He_k(p)_I - Σ_{s ∈ I} δ_{a,s} He_{k-1}(p)_{I∖s}``.
    """
    c, b = p.shape
    eye = torch.eye(b, dtype=p.dtype, device=p.device)
    previous, current = torch.ones(c, dtype=p.dtype, device=p.device), p
    if k == 0:
        return previous
    for order in range(1, k):
        step = p.reshape(c, b, *([1] * order)) * current[:, None]
        # δ between the new index and each old one times He_{k-1} of the others: He_{k-1} is
        # symmetric, so one product moved to every position covers the sum.
        delta = torch.einsum("ab,c...->cab...", eye, previous)
        for position in range(order):
            step = step - torch.movedim(delta, 2, 2 + position)
        previous, current = current, step
    return current


def _gap(values: Tensor, count: int) -> float:
    """``values[count-1] / values[count]`` of a descending spectrum (inf past its end)."""
    if count >= len(values):
        return math.inf
    return float(values[count - 1] / values[count].clamp_min(1e-300))


def _cp(
    tensors: list[Tensor], noises: list[float], order: int, count: int, rng: torch.Generator
) -> tuple[Tensor, Tensor, float]:
    """Symmetric CP with shared components.

    Returns unit columns ``[B, count]``, the first tensor's weights, and ``1 -`` the relative
    residual (root of the squared one) of the noise-weighted fit.
    """
    # Each moment divided by its noise: a noisier source counts less (weighted least squares).
    scaled = [t / max(n, 1e-300) for t, n in zip(tensors, noises, strict=True)]
    b = scaled[0].shape[0]
    candidates = []
    for trial in range(_TRIALS):
        # Jennrich: T(I, I, w, ...) = U diag(λ ⊙ (Uᵀw)^{n-2}) Uᵀ, so the eigenvectors of
        # M1 M2⁺ are U's columns.  Slices of one source, or random mixtures of the sources'
        # slices (every other trial), keep that form.
        single = trial % 2 == 0 and len(scaled) > 1
        pair = []
        for _side in range(2):
            w = torch.randn(b, generator=rng, dtype=torch.float64).to(scaled[0].device)
            mix = torch.randn(len(scaled), generator=rng, dtype=torch.float64).to(w.device)
            if single:  # one source at a time: a noisy source cannot spoil the others' seeds
                mix = torch.zeros_like(mix).index_fill_(
                    0, torch.tensor(trial // 2 % len(mix), device=mix.device), 1
                )
            pair.append(sum(c * _slice(t, w) for c, t in zip(mix, scaled, strict=True)))
        values, vectors = torch.linalg.eig(pair[0] @ torch.linalg.pinv(pair[1]))
        # Noise can make eigenvalues complex; their real parts still seed the refinement.
        candidate = vectors[:, values.abs().argsort(descending=True)[:count]].real
        candidates.append((float(_objective(candidate, scaled, order)[0]), trial, candidate))
    # Refine the few best seeds: the residual has local minima, mostly near poor seeds.
    refined = [_fit(c, scaled, order) for _, _, c in sorted(candidates)[:_REFINED]]
    components = min(refined, key=lambda u: float(_objective(u, scaled, order)[0]))
    components = components / components.norm(dim=0, keepdim=True)
    total = sum(float(t.pow(2).sum()) for t in scaled)
    residual = float(_objective(components, scaled, order)[0]) / total
    return components, _weights(components, tensors[0], order), 1 - math.sqrt(max(residual, 0))


def _slice(tensor: Tensor, w: Tensor) -> Tensor:
    """``T(I, I, w, ..., w)``: every mode after the second contracted with ``w``."""
    while tensor.ndim > 2:
        tensor = tensor @ w
    return tensor


def _objective(u: Tensor, tensors: list[Tensor], order: int) -> tuple[Tensor, Tensor]:
    """CP residual ``Σ_t ‖T_t - Σ_i λ_ti û_i^{⊗n}‖²`` at the least-squares λ, and its gradient.

    Variable projection: λ = G⁻¹c with the rank-one terms' Gram ``G = (ÛᵀÛ)^{∘n}`` and
    ``c_i = T(û_i, ..., û_i)``.  At that λ the gradient in ``û_i`` is ``-2n λ_i [T(I, û_i^{n-1}) -
    Σ_k λ_k (û_k·û_i)^{n-1} û_k]`` (T symmetric), then projected through the normalisation.
    Written out because autograd's overhead dominates on tensors this small.
    """
    norms = u.norm(dim=0).clamp_min(1e-300)
    unit = u / norms
    count = unit.shape[1]
    powers = [unit]  # Khatri-Rao powers: column i of powers[k] is vec(û_i^{⊗(k+1)})
    for _ in range(order - 1):
        powers.append((powers[-1][:, None, :] * unit[None, :, :]).reshape(-1, count))
    cos = unit.T @ unit
    # A tiny ridge keeps equal columns (a poor Jennrich candidate) solvable.
    gram = cos**order + 1e-10 * torch.eye(count, dtype=u.dtype, device=u.device)
    loss, grad = u.new_zeros(()), torch.zeros_like(u)
    for tensor in tensors:
        inner = tensor.reshape(-1) @ powers[-1]
        weights = torch.linalg.solve(gram, inner)
        loss = loss + tensor.pow(2).sum() - inner @ weights
        contracted = tensor.reshape(len(unit), -1) @ powers[-2]  # T(I, û_i^{n-1})
        fitted = unit @ (weights[:, None] * cos ** (order - 1))
        grad = grad - 2 * order * weights * (contracted - fitted)
    return loss, (grad - unit * (unit * grad).sum(0)) / norms


def _weights(u: Tensor, tensor: Tensor, order: int) -> Tensor:
    """Least-squares CP weights of ``tensor`` for the unit columns ``u``."""
    power = u
    for _ in range(order - 1):
        power = (power[:, None, :] * u[None, :, :]).reshape(-1, u.shape[1])
    gram = (u.T @ u) ** order + 1e-10 * torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return torch.linalg.solve(gram, tensor.reshape(-1) @ power)


def _fit(u: Tensor, tensors: list[Tensor], order: int) -> Tensor:
    """Refine CP components by minimising the residual over them (L-BFGS)."""
    u = u.clone()
    optimizer = torch.optim.LBFGS(
        [u], max_iter=100, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        loss, u.grad = _objective(u, tensors, order)
        return loss

    optimizer.step(closure)
    return u
