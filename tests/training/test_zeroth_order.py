"""Zeroth-order optimisation (Yu et al., NeurIPS 2024) and the MeZO-style client trainer."""

import math

import pytest
import torch

from fedleak.optim import zeroth_order as zo

D = zo.DTYPE


def quadratic(dim: int, seed: int):
    """``f(x) = (x - x*)^T A (x - x*) / 2`` with eigenvalues 1..5 in a random basis, and x*."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=D))
    a = (q * torch.linspace(1, 5, dim, dtype=D)) @ q.T
    x_star = torch.randn(dim, generator=g, dtype=D)
    return (lambda x: 0.5 * (((x - x_star) @ a) * (x - x_star)).sum(1)), a, x_star


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_stage_reaches_the_optimum_of_a_noisy_quadratic(seed):
    """Stated tolerance: |x_T - x*| <= 0.02 at T = 1e5, d = 3, noise std 0.1 (measured
    0.003-0.006 over seeds 0-4)."""
    f, _, x_star = quadratic(3, seed)
    g = torch.Generator().manual_seed(seed)
    algorithm = zo.two_stage(
        torch.zeros(3, dtype=D), 10**5, rho=0.1, strong_convexity=1.0, rng=g, noise_std=0.1
    )
    x, used = zo.drive(algorithm, zo.noisy(f, 0.1, g))
    assert float((x - x_star).norm()) <= 0.02
    assert used == zo.plan(10**5, 3, 0.1, 1.0, 0.1).queries <= 10**5


def test_two_stage_is_exact_on_a_noise_free_quadratic():
    f, _, x_star = quadratic(4, 0)
    g = torch.Generator().manual_seed(0)
    algorithm = zo.two_stage(torch.zeros(4, dtype=D), 10**4, rho=1.0, strong_convexity=1.0, rng=g)
    x, _ = zo.drive(algorithm, f)
    assert float((x - x_star).norm()) < 1e-8


def test_the_estimators_are_exact_on_a_quadratic():
    """Central and second differences of a quadratic have no bias; the sphere estimate's mean
    over many directions tends to Z grad f (variance ~ d |Z grad f|^2 / n)."""
    f, a, x_star = quadratic(3, 1)
    x = torch.tensor([0.3, -0.2, 1.0], dtype=D)
    grad = a @ (x - x_star)
    m, _ = zo.drive(zo.bootstrapping_estimate(x, 0.5, 2), f)
    h, _ = zo.drive(zo.hessian_estimate(x, 0.5, 1, floor=0.1), f)
    assert torch.allclose(m, grad, atol=1e-10)
    assert torch.allclose(h, a, atol=1e-9)
    z = 0.3 * torch.eye(3, dtype=D)
    estimate, used = zo.drive(zo.gradient_estimate(x, z, 20000, torch.Generator()), f)
    assert used == 40000
    assert float((estimate - z @ grad).norm()) < 0.05 * float((z @ grad).norm())


def test_newton_step_is_plain_newton_inside_the_trust_radius_and_clipped_outside():
    h = torch.diag(torch.tensor([1.0, 4.0], dtype=D))
    g = torch.tensor([0.2, 0.4], dtype=D)
    assert torch.allclose(zo.newton_step(h, g, 10.0), -torch.linalg.solve(h, g))
    step = zo.newton_step(h, 100 * g, 1.0)
    assert math.isclose(float(step.norm()), 1.0, rel_tol=1e-6)
    assert float(step @ (100 * g)) < 0  # still a descent direction


def test_logcosh_problem_has_the_stated_constants():
    f = zo.logcosh_problem(5, torch.Generator().manual_seed(0))
    assert math.isclose(f.rho, 1.0, rel_tol=1e-12)
    assert math.isclose(f.strong_convexity, 1.0, rel_tol=1e-9)
    x_star, f_star = f.minimum()
    probe = x_star + 1e-3 * torch.randn(20, 5, dtype=D, generator=torch.Generator())
    assert bool((f(probe) >= f_star).all())


def test_zo_sgd_spends_its_budget_in_pairs():
    f, _, x_star = quadratic(2, 0)
    x, used = zo.drive(
        zo.zo_sgd(torch.zeros(2, dtype=D), 2001, strong_convexity=1.0, rng=torch.Generator()), f
    )
    assert used == 2000
    assert float((x - x_star).norm()) < float(x_star.norm())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: zo.plan(1000, 8, 1.0, 1.0), "use a budget of at least"),
        (lambda: zo.plan(10**4, 2, 0.0, 1.0), "rho, strong_convexity and noise_std must be > 0"),
        (lambda: zo.plan(10**4, 0, 1.0, 1.0), "dimension must be >= 1"),
        (
            lambda: next(zo.zo_sgd(torch.zeros(2), 1, strong_convexity=1.0, rng=torch.Generator())),
            "budget must be >= 2",
        ),
    ],
)
def test_bad_options_are_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_smallest_budget_named_works():
    with pytest.raises(ValueError, match="at least") as err:
        zo.plan(1000, 8, 1.0, 1.0)
    least = int(str(err.value).rsplit(" ", 1)[1])
    assert zo.plan(least, 8, 1.0, 1.0).n_h1 == 1
    with pytest.raises(ValueError):
        zo.plan(least - 1, 8, 1.0, 1.0)


# -- the MeZO-style client ------------------------------------------------------------------


def mezo_experiment(**training):
    from fedleak import config

    options = {"name": "mezo", "lr": 1e-3, "local_steps": 3, "batch_size": 8, "directions": 4}
    return config.load(
        {
            "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden": [16]},
            "clients": 4,
            "clients_per_round": 2,
            "training": {**options, **training},
        }
    )


@pytest.mark.parametrize("extra", [{}, {"noise_std": 0.5, "clip": 2.0}, {"parameters": ["3."]}])
def test_the_seed_replay_reproduces_the_clients_update_exactly(extra):
    from fedleak import federation, seeding

    exp = mezo_experiment(**extra)
    sent = federation.initial_params(exp)
    update = federation.local_update(exp, 1, 2, sent)
    assert update.params == {}  # no model leaves the client
    assert set(update.messages) == {"seeds", "projected"}
    assert update.messages["projected"].shape == (3, 4)
    server = federation.reply(exp, 1, sent, update).params
    # the client's own state after the same round
    model = exp.build_model()
    model.load_state_dict(sent)
    rng = seeding.rng(exp.seed, "train", 1, 2)
    exp.trainer.fit(model, exp.client_data(1), exp.loss_fn, rng, instructions={})
    client = model.state_dict()
    assert client.keys() == server.keys()
    assert all(torch.equal(client[k], server[k]) for k in client)
    moved = [k for k in client if not torch.equal(client[k], sent[k])]
    assert moved == exp.trainer.perturbed(model)


def test_one_step_projected_differences_are_directional_derivatives():
    """With one step, ``p_j`` is ``<grad L, z_j>`` up to O(eps^2), so ``-delta / lr``, the
    ``(1/n) sum_j p_j z_j`` the attacks receive, estimates the gradient."""
    import copy

    from fedleak.training.zeroth_order import _directions

    exp = mezo_experiment(local_steps=1, batch_size=0, directions=3, eps=1e-7)
    model = exp.build_model().double()
    start = copy.deepcopy(model)
    data = exp.client_data(0)
    data = type(data)(data.inputs.double(), data.labels)
    result = exp.trainer.fit(model, data, exp.loss_fn, torch.Generator(), instructions={})
    names = exp.trainer.perturbed(model)
    params = dict(start.named_parameters())
    loss = exp.loss_fn(start(data.inputs), data.labels)
    grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names]), strict=True))
    theta = {k: params[k].detach() for k in names}
    z = _directions(theta, int(result.messages["seeds"][0]), 3)
    for j, direction in enumerate(z):
        exact = sum(float((grads[k] * direction[k]).sum()) for k in names)
        assert math.isclose(float(result.messages["projected"][0, j]), exact, rel_tol=1e-6)
    estimate = sum(float(result.messages["projected"][0, j]) * z[j][names[0]] for j in range(3))
    moved = (model.state_dict()[names[0]] - theta[names[0]]) / -exp.trainer.lr
    assert torch.allclose(moved, estimate / 3, atol=1e-12)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"eps": -1.0}, "eps must be > 0"),
        ({"directions": 0}, "directions must be >= 1"),
        ({"noise_std": -0.1}, "clip and noise_std must be >= 0"),
        ({"parameters": ["nope"]}, "match none of the model's parameters"),
    ],
)
def test_bad_mezo_options_are_one_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        mezo_experiment(**options).check()


def test_a_federated_run_records_the_seeds_and_the_replayed_state(tmp_path, tiny):
    from fedleak import config, pipeline

    training = {"name": "mezo", "lr": 0.05, "local_steps": 2, "batch_size": 2, "directions": 3}
    exp = config.load(tiny(training=training))
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    views = list(store.views(exp))
    assert len(views) == 4  # 2 rounds x 2 clients
    for view in views:
        assert set(view.messages) == {"seeds", "projected"}
        assert view.messages["projected"].shape == (2, 3)
        assert "seed" in view.instructions
        # what the attacks read is the state the seeds rebuild
        rebuilt = exp.trainer.replay(view.sent, view.messages, exp.build_model)
        assert all(torch.equal(rebuilt[k], view.received[k]) for k in rebuilt)
        assert any(bool(d.abs().sum() > 0) for d in view.delta().values())
    assert len(store.rows("results.csv")) == 4  # DLG ran on every replayed view
