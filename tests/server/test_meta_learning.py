"""The meta-learning decomposition (Jeon et al., ICML 2024) for conjugate client tasks."""

import itertools
import math

import numpy as np
import pytest

from fedleak.analysis.meta_learning import BernoulliTasks, GaussianTasks


def rng(seed=0):
    return np.random.default_rng(seed)


def test_gaussian_terms_sum_to_the_joint_entropy_to_numerical_precision():
    model = GaussianTasks(dim=4, prior_std=1.3, task_std=0.4, noise_std=0.7)
    _, _, inputs, targets = model.sample(3, 5, rng())
    gram, _ = model.statistics(inputs, targets)
    # chain rule: irreducible + meta + intra == h(Y | X) / (M T) from the 15 x 15 covariance
    assert model.terms(gram, 5).total == pytest.approx(model.joint_entropy(inputs), abs=1e-12)


def test_gaussian_orthogonal_design_matches_the_closed_form():
    model = GaussianTasks()
    draw = rng(1)
    # X_m^T X_m = T I: scaled orthonormal columns
    inputs = np.stack([np.linalg.qr(draw.standard_normal((16, 8)))[0] * 4 for _ in range(3)])
    gram = np.einsum("mti,mtj->mij", inputs, inputs)
    got, closed = model.terms(gram, 16), model.closed_form(3, 16)
    assert got.meta == pytest.approx(closed.meta, rel=1e-12)
    assert got.intra == pytest.approx(closed.intra, rel=1e-12)
    assert closed.meta * 3 * 16 == pytest.approx(4 * math.log1p(3 * 16 / (0.25 + 0.25 * 16)))


def test_gaussian_monte_carlo_agrees_with_the_exact_terms():
    model = GaussianTasks(dim=4)
    exact, exact_se = model.expected_terms(3, 8, rng(2), draws=400)
    mc, mc_se = model.monte_carlo(3, 8, rng(3), draws=3000)
    for name in ("meta", "intra"):
        gap = abs(getattr(mc, name) - getattr(exact, name))
        assert gap < 4 * math.hypot(getattr(mc_se, name), getattr(exact_se, name)), name
    assert abs(mc.irreducible - exact.irreducible) < 4 * mc_se.irreducible


def test_gaussian_intra_term_ignores_the_number_of_clients():
    model = GaussianTasks()
    per_token = [model.closed_form(m, 32).intra for m in (1, 16, 256)]
    assert per_token == pytest.approx([per_token[0]] * 3, rel=1e-12)
    # while the meta term's numerator grows by (d/2) ln 4 per x4 clients once T is large
    grow = [model.closed_form(m, 10**6).meta * m * 10**6 for m in (64, 256)]
    assert grow[1] - grow[0] == pytest.approx(4 * math.log(4), rel=1e-2)


def test_gaussian_new_client_split():
    model = GaussianTasks()
    alone = model.new_client(0, 4, rng(4), draws=200)
    crowd = model.new_client(256, 4, rng(5), draws=200)
    assert crowd[0] < alone[0] / 10  # more clients remove the meta part...
    # ...but not the intra-task part
    assert crowd[2] == pytest.approx(alone[2], abs=4 * math.hypot(crowd[3], alone[3]))


def test_gaussian_leakage_and_the_bayes_attack():
    model = GaussianTasks()
    _, theta, inputs, targets = model.sample(300, 16, rng(6))
    leak = model.leakage(*model.statistics(inputs, targets))
    # the message is sufficient for theta_m given X_m: knowing psi can only lower the information
    assert (leak.message_only >= leak.beyond_population).all()
    assert (leak.with_others >= leak.message_only - 1e-12).all()
    # the attack reaches the posterior's expected error, which no attacker can beat
    achieved = ((leak.estimate - theta) ** 2).sum(1).mean()
    assert achieved == pytest.approx(leak.posterior_mse.mean(), rel=0.15)
    assert (leak.posterior_mse >= model.mse_bound(leak.with_others) - 1e-12).all()


def test_bernoulli_meta_term_matches_enumeration():
    model = BernoulliTasks(prior_a=2.0, prior_b=1.0, concentration=3.0, nodes=256)
    clients, tokens = 2, 3
    psi, w = model.grid
    table = np.exp(model.log_count_probs(tokens, psi))  # [nodes, T + 1]
    exact = 0.0
    for counts in itertools.product(range(tokens + 1), repeat=clients):
        p = w @ np.prod(table[:, list(counts)], axis=1)
        exact += p * model.meta_information_given(np.array(counts), tokens)
    est, se = model.terms(clients, tokens, rng(7), draws=4000)
    assert est.meta * clients * tokens == pytest.approx(exact, abs=4 * se.meta * clients * tokens)


def test_bernoulli_monte_carlo_agrees_with_the_exact_terms():
    model = BernoulliTasks()
    exact, exact_se = model.terms(4, 8, rng(8), draws=1000)
    mc, mc_se = model.monte_carlo(4, 8, rng(9), draws=6000)
    assert abs(mc.irreducible - exact.irreducible) < 4 * mc_se.irreducible
    assert abs(mc.intra - exact.intra) < 4 * mc_se.intra
    assert abs(mc.meta - exact.meta) < 4 * math.hypot(mc_se.meta, exact_se.meta)


def test_bernoulli_quadrature_has_converged_and_leakage_is_ordered():
    coarse, fine = BernoulliTasks(nodes=128), BernoulliTasks(nodes=1024)
    assert coarse.intra_information(64) == pytest.approx(fine.intra_information(64), abs=1e-6)
    assert fine.information_about_theta(64) > fine.intra_information(64)
    _, theta, counts = fine.sample(400, 32, rng(10))
    guess = fine.attack(counts, 32)
    assert ((guess - theta) ** 2).mean() < 0.5 * theta.var()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: GaussianTasks(noise_std=0.0), "noise_std"),
        (lambda: GaussianTasks(dim=0), "dim"),
        (lambda: BernoulliTasks(concentration=-1.0), "concentration"),
        (lambda: BernoulliTasks(nodes=2), "nodes"),
        (lambda: GaussianTasks().closed_form(0, 4), "clients >= 1"),
        (lambda: BernoulliTasks().terms(2, 2, rng(), draws=0), "draws"),
        (lambda: GaussianTasks().new_client(-1, 2, rng(), draws=1), "clients must be >= 0"),
    ],
)
def test_bad_options_are_one_clear_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()
