import pytest
import torch
from torch import nn

from fedleak import seeding
from fedleak.core import Batch, Setting, Task
from fedleak.registry import ConfigError
from fedleak.robust.epo import non_uniformity
from fedleak.robust.groups import group_losses
from fedleak.training import TRAINERS

TASK = Task("image", (1, 2, 2), 2)


def spurious(n=200, seed=0):
    """Two features: a clean-but-weak core one and a strong spurious one; groups y * 2 + a."""
    rng = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=rng)
    a = torch.where(torch.rand(n, generator=rng) < 0.9, y, 1 - y)
    core = (2.0 * y - 1) * 0.5 + 0.5 * torch.randn(n, generator=rng)
    spur = (2.0 * a - 1) * 2.0 + 0.3 * torch.randn(n, generator=rng)
    x = torch.stack([core, spur, torch.randn(n, generator=rng), torch.ones(n)], 1)
    return x.view(n, 1, 2, 2), y, y * 2 + a


def model():
    with seeding.isolated(0, "model"):
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def final_losses(net, x, y, g):
    with torch.no_grad():
        per = nn.functional.cross_entropy(net(x), y, reduction="none")
    return group_losses(per, g, 4)[0].numpy()


def test_epo_client_balances_its_groups_and_trains_only_the_block():
    x, y, g = spurious()
    results = {}
    for method in ("erm", "epo"):
        net = model()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        trainer = TRAINERS["cpt"](
            lr=0.2,
            local_steps=150,
            momentum=0.5,
            method=method,
            num_groups=4,
            block=("1.bias", "3."),
        )
        out = trainer.fit_groups(net, x, y, g, nn.functional.cross_entropy, seeding.rng(0), 4)
        assert set(out.messages) == set(TRAINERS["cpt"].sends)
        assert out.messages["group_losses"].shape == (4,)
        assert out.messages["group_weights"].sum().item() == pytest.approx(1.0, abs=1e-5)
        after = net.state_dict()
        torch.testing.assert_close(after["1.weight"], before["1.weight"])  # frozen backbone
        assert not torch.equal(after["1.bias"], before["1.bias"])
        assert out.steps == 150 and len(out.used) == len(y)
        results[method] = final_losses(net, x, y, g)
    assert non_uniformity(results["epo"]) < 0.5 * non_uniformity(results["erm"])
    assert results["epo"].max() < results["erm"].max()


def test_preference_lowers_the_preferred_groups_loss():
    x, y, g = spurious()
    losses = {}
    for c in ((1.0, 1.0, 1.0, 1.0), (1.0, 4.0, 1.0, 1.0)):
        net = model()
        trainer = TRAINERS["cpt"](
            lr=0.2,
            local_steps=150,
            momentum=0.5,
            num_groups=4,
            preference=c,
            block=("1.bias", "3."),
        )
        trainer.fit_groups(net, x, y, g, nn.functional.cross_entropy, seeding.rng(0), 4)
        losses[c[1]] = final_losses(net, x, y, g)
    assert losses[4.0][1] < losses[1.0][1]


def test_fit_reads_groups_from_the_data_or_the_labels():
    x, y, g = spurious(40)
    batch = Batch(x, y)
    with pytest.raises(ValueError, match="use groups = 'labels'"):
        TRAINERS["cpt"](num_groups=4).fit(
            model(), batch, nn.functional.cross_entropy, seeding.rng(0)
        )
    out = TRAINERS["cpt"](num_groups=4, method="erm").fit(
        model(), Batch(x, y, g), nn.functional.cross_entropy, seeding.rng(0)
    )
    assert torch.allclose(out.messages["group_weights"], torch.bincount(g, minlength=4) / 40.0)
    out = TRAINERS["cpt"](groups="labels").fit(
        model(), batch, nn.functional.cross_entropy, seeding.rng(0)
    )
    assert out.messages["group_losses"].shape == (2,)
    # a client holding one class still sends one entry per class: 0 marks the missing one
    one = Batch(x[y == 0], y[y == 0])
    out = TRAINERS["cpt"](groups="labels", method="erm").fit(
        model(), one, nn.functional.cross_entropy, seeding.rng(0)
    )
    assert out.messages["group_losses"][1] == 0 and out.messages["group_losses"][0] > 0
    assert out.messages["group_weights"].tolist() == [1.0, 0.0]  # erm: its label proportions


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"local_steps": 0}, "local_steps must be >= 1"),
        ({"method": "dro"}, "must be one of"),
        ({"num_groups": 4, "preference": [1.0, 2.0]}, "preference has 2 entries but there are 4"),
        ({"preference": [1.0, -1.0]}, "preference entries must be > 0"),
        ({"method": "erm", "preference": [1.0, 2.0]}, "steers method = 'epo' only"),
        ({"dro_step": 0.0}, "dro_step must be > 0"),
        ({"momentum": 1.0}, "momentum must be in"),
    ],
)
def test_bad_options_are_one_clear_error(options, match):
    with pytest.raises(ConfigError, match=match):
        TRAINERS.build({"name": "cpt", **options}, "training")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"block": ["head."], "num_groups": 4}, "block prefix 'head.' matches no parameter"),
        ({}, "needs num_groups"),
        ({"groups": "labels", "num_groups": 4}, "set num_groups = 0"),
        ({"groups": "labels", "preference": [1.0, 1.0, 1.0]}, "preference has 3 entries"),
    ],
)
def test_check_refuses_impossible_settings(options, match):
    trainer = TRAINERS["cpt"](**options)
    with pytest.raises(ValueError, match=match):
        trainer.check(Setting(TASK, model(), trainer))


def test_a_federated_run_balances_the_datas_groups_and_reports_the_worst_group(tmp_path):
    """groups = "data": waterbirds_lite's label x texture ids reach every client's trainer."""
    from fedleak import config, pipeline, results

    exp = config.load(
        {
            "seed": 0,
            "rounds": 2,
            "clients": 4,
            "clients_per_round": 2,
            "data": {"name": "waterbirds_lite", "size": 8},
            "model": {"name": "mlp", "hidden": [16]},
            "training": {"name": "cpt", "num_groups": 4, "local_steps": 2, "block": ["3."]},
            "observe": {"rounds": [1], "clients_per_round": 0},
        }
    )
    store = pipeline.run(exp, tmp_path / "run")
    utility = results.read(store.root / "utility.csv")
    assert (utility["worst_group_accuracy"] <= utility["test_accuracy"]).all()
    truth = exp.dataset().train.groups
    for view in store.views(exp):
        own = truth[exp.partitions()[view.client]]
        held = torch.bincount(own, minlength=4) > 0
        # a group's loss is 0 exactly when the client holds none of it
        assert torch.equal(view.messages["group_losses"] > 0, held)
