import math

import pytest
import torch
from torch import nn

from fedleak import seeding
from fedleak.core import Batch, Setting, Task
from fedleak.models import MODELS
from fedleak.training import TRAINERS
from fedleak.training.contrastive import augment, nt_xent

TASK = Task("image", (1, 8, 8), 3)


def blobs(n=96, seed=0):
    """Three classes of 8x8 images: a bright bar in a class-specific place, plus noise."""
    rng = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = 0.2 * torch.randn(n, 1, 8, 8, generator=rng)
    for c in range(3):
        x[labels == c, 0, 2 * c + 1 : 2 * c + 3, :] += 2.0
    return Batch(x, labels)


def net(nonnegative):
    with seeding.isolated(0, "model"):
        return MODELS["contrastive_mlp"](hidden=(32,), projector=(32, 16), nonnegative=nonnegative)(
            TASK
        )


def train(nonnegative, epochs=15):
    model = net(nonnegative)
    trainer = TRAINERS["contrastive"](
        lr=3e-3, local_epochs=1, batch_size=32, activity=0.1 if nonnegative else 0.0
    )
    trainer.check(Setting(TASK, model, trainer))
    rng = seeding.rng(0)
    data = blobs()
    for _ in range(epochs):
        trainer.fit(model, data, nn.functional.cross_entropy, rng)
    return model, data


def test_ncl_features_are_non_negative_and_cl_features_are_not():
    ncl, data = train(True)
    cl, _ = train(False)
    with torch.no_grad():
        z_ncl, z_cl = ncl.embed(data.inputs), cl.embed(data.inputs)
    assert z_ncl.min() >= 0 and (z_ncl > 0).any()
    assert z_cl.min() < 0


def test_contrastive_steps_lower_the_loss_and_report_every_example():
    model = net(False)
    trainer = TRAINERS["contrastive"](lr=3e-3, local_epochs=3, batch_size=32)
    data = blobs()
    rng = seeding.rng(0)
    first = trainer.fit(model, data, nn.functional.cross_entropy, rng)
    for _ in range(5):
        last = trainer.fit(model, data, nn.functional.cross_entropy, rng)
    assert last.loss < first.loss - 0.1
    assert first.steps == 9 and len(first.used) == len(data)
    assert first.messages == {} and TRAINERS["contrastive"].sends == {}


def test_augment_is_seeded_shape_preserving_and_random():
    x = blobs(8).inputs
    a = augment(x, seeding.rng(1))
    assert a.shape == x.shape
    torch.testing.assert_close(a, augment(x, seeding.rng(1)))
    assert not torch.allclose(a, augment(x, seeding.rng(2)))
    identity = augment(x, seeding.rng(1), min_scale=1.0, shift=0.0, jitter=0.0, noise=0.0)
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)


def test_nt_xent_matches_its_closed_form_on_orthogonal_views():
    # 8 orthogonal directions, two views each: cosine 1 with the positive, 0 with 14 negatives
    z = torch.eye(8) * 5
    aligned = nt_xent(torch.cat([z, z]), 0.2)
    assert aligned.item() == pytest.approx(math.log(1 + 14 * math.exp(-5)), rel=1e-5)
    # positives swapped for orthogonal rows: the positive scores 0 and one negative scores 5
    shuffled = nt_xent(torch.cat([z, z.roll(1, 0)]), 0.2)
    assert shuffled.item() == pytest.approx(math.log(math.exp(5) + 14), rel=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": 0}, "temperature must be > 0"),
        ({"activity": -1}, "activity must be >= 0"),
        ({"min_scale": 0}, "min_scale must be in"),
        ({"jitter": 1}, "jitter must be in"),
        ({"noise": -0.1}, "noise must be >= 0"),
        ({"probe": -1}, "probe must be >= 0"),
        ({"lr": 0}, "lr must be > 0"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        TRAINERS["contrastive"](**options)


def test_activity_without_a_non_negative_model_is_refused():
    trainer = TRAINERS["contrastive"](activity=0.1)
    with pytest.raises(ValueError, match="nonnegative = true or activity = 0"):
        trainer.check(Setting(TASK, net(False), trainer))
    trainer.check(Setting(TASK, net(True), trainer))


def test_a_model_without_embed_is_refused():
    trainer = TRAINERS["contrastive"]()
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="contrastive_mlp"):
        trainer.check(Setting(TASK, plain, trainer))


def test_bad_model_options():
    with pytest.raises(ValueError, match="projector is"):
        MODELS["contrastive_mlp"](projector=(32,))
    with pytest.raises(ValueError, match="hidden needs"):
        MODELS["contrastive_mlp"](hidden=())


def test_a_federated_ncl_run_keeps_the_global_features_non_negative(tmp_path, tiny):
    from fedleak import config, pipeline

    exp = config.load(
        tiny(
            model={
                "name": "contrastive_mlp",
                "hidden": [16],
                "projector": [16, 8],
                "nonnegative": True,
            },
            training={"name": "contrastive", "lr": 3e-3, "batch_size": 8, "activity": 0.1},
            attacks=[],
        )
    )
    store = pipeline.run(exp, tmp_path / "run")
    assert store.meta()["status"] == "done"
    views = list(store.views(exp))
    assert len(views) == 4  # 2 rounds x 2 clients
    test = exp.dataset().test
    for view in views:
        assert view.messages == {}  # the trainer declares nothing beside the state
        assert any(bool(d.abs().sum() > 0) for d in view.delta().values())
        with torch.no_grad():
            assert view.model().embed(test.inputs).min() >= 0


def test_activity_on_a_signed_model_is_one_config_error(tiny):
    from fedleak import config
    from fedleak.registry import ConfigError

    spec = tiny(
        model={"name": "contrastive_mlp", "hidden": [16], "projector": [16, 8]},
        training={"name": "contrastive", "activity": 0.1},
    )
    with pytest.raises(ConfigError, match="nonnegative = true or activity = 0"):
        config.load(spec).check()
