"""The structured pruning layer on tiny random Llama (GQA) and BERT models."""

from __future__ import annotations

import re

import pytest
import torch

from fedleak.pruning import PRUNERS
from fedleak.pruning.adapters import adapter
from fedleak.pruning.calibration import block_inputs, collect, dense_inputs
from fedleak.pruning.structure import least_squares
from fedleak.pruning.structured import batches, parameter_count
from tests.pruning.conftest import outputs, tiny_bert, tiny_llama, tokens

METHODS = {
    "goa": {"refit": False},
    "goa_refit": {"refit": True},
    "goa_closed": {"score": "closed_form", "refit": False},
    "magnitude": {},
    "random": {},
    "wanda_sp": {},
    "flap": {},
}


def _pruner(key: str, **options):
    name = "goa" if key.startswith("goa") else key
    return PRUNERS[name](**{**METHODS[key], **options})


@pytest.mark.parametrize("key", sorted(METHODS))
def test_mask_and_physical_give_identical_outputs(build, key):
    ids, calib = tokens(4, 12, seed=5), tokens(64, 24)
    masked, physical = build(), build()
    _pruner(key, ratio=0.5, mode="mask").prune(masked, calib, torch.Generator().manual_seed(3))
    _pruner(key, ratio=0.5, mode="physical").prune(
        physical, calib, torch.Generator().manual_seed(3)
    )
    assert torch.allclose(outputs(masked, ids), outputs(physical, ids), atol=1e-4)
    block = adapter(physical).blocks()[0]
    assert block.ffn.down.in_features == 64  # half of the 128 channels really gone
    assert block.attn.q.out_features == 2 * block.attn.head_dim  # half of the 4 heads
    assert parameter_count(physical) == parameter_count(masked) or key == "flap"


def test_gqa_groups_are_respected():
    model = tiny_llama()
    pruned = PRUNERS["wanda_sp"](ratio=0.5, mode="physical").prune(
        model, tokens(32, 24), torch.Generator()
    )
    for mask in pruned.head_mask:
        assert mask.reshape(2, 2).sum(1).tolist() == [1, 1]  # one query head per k/v group
    whole = tiny_llama()
    pruned = PRUNERS["wanda_sp"](ratio=0.5, gqa="whole_group", mode="physical").prune(
        whole, tokens(32, 24), torch.Generator()
    )
    for mask, block in zip(pruned.head_mask, adapter(whole).blocks(), strict=True):
        assert sorted(mask.reshape(2, 2).sum(1).tolist()) == [0, 2]  # one whole group gone
        assert block.attn.k.out_features == block.attn.head_dim
    outputs(whole, tokens(2, 8))  # the smaller model still runs


def test_same_seed_same_mask_and_other_seed_other_mask():
    def mask(seed):
        model = tiny_llama()
        pruned = PRUNERS["random"](ratio=0.5).prune(
            model, None, torch.Generator().manual_seed(seed)
        )
        return pruned.channel_mask

    assert torch.equal(mask(0), mask(0))
    assert not torch.equal(mask(0), mask(1))


def test_refit_with_nothing_pruned_reproduces_the_dense_output(build):
    model = build()
    ad = adapter(model)
    block = ad.blocks()[0]
    stream = block_inputs(ad, batches(tokens(64, 24), 8))
    dense, _ = dense_inputs(block, stream)
    measured = collect(block, stream, want=("z",), dense={"z": dense["z"]})
    weight, bias = least_squares(measured.moments["z"], block.ffn.down, ridge=1e-9)
    assert torch.allclose(weight, block.ffn.down.weight, atol=1e-3)
    if bias is not None:
        assert torch.allclose(bias, block.ffn.down.bias, atol=1e-3)


def test_goa_refit_reduces_the_output_error():
    ids, calib = tokens(8, 24, seed=9), tokens(64, 24)
    dense = outputs(tiny_llama(), ids)
    errors = {}
    for refit in (False, True):
        model = tiny_llama()
        PRUNERS["goa"](ratio=0.3, refit=refit).prune(model, calib, torch.Generator())
        errors[refit] = (outputs(model, ids) - dense).pow(2).mean().item()
    assert errors[True] < errors[False]


def test_goa_self_generated_calibration_is_seeded():
    from fedleak.pruning.goa import self_generated

    a = self_generated(tiny_llama(), 3, 6, torch.Generator().manual_seed(0))
    b = self_generated(tiny_llama(), 3, 6, torch.Generator().manual_seed(0))
    assert a.shape == (3, 6) and torch.equal(a, b)
    PRUNERS["goa"](ratio=0.25, calibration="self_generated", samples=40, length=16).prune(
        tiny_llama(), None, torch.Generator()
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 1.0}, "ratio must be in [0, 1)"),
        ({"ratio": -0.1}, "ratio must be in [0, 1)"),
        ({"mode": "drop"}, "mode must be 'mask' or 'physical'"),
        ({"blocks": (3, 1)}, "blocks must be"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PRUNERS["goa"](**options)


def test_unknown_model_type_is_one_clear_error():
    with pytest.raises(ValueError, match="no adapter for model type"):
        PRUNERS["magnitude"]().prune(torch.nn.Linear(3, 3), None, torch.Generator())


def test_too_few_calibration_tokens_for_the_refit_is_one_clear_error():
    with pytest.raises(ValueError, match="needs at least 256 calibration tokens"):
        PRUNERS["goa"](refit=True).prune(tiny_llama(), tokens(4, 24), torch.Generator())
    PRUNERS["goa"](refit=False).prune(tiny_llama(), tokens(4, 24), torch.Generator())


def test_bert_encoder_inside_the_project_classifier():
    from fedleak.models.bert import TextClassifier

    classifier = TextClassifier(_bert_classifier(), pad_id=0, pooler_layer="", classifier_layer="")
    ids = tokens(4, 10)
    before = classifier(ids)
    PRUNERS["flap"](ratio=0.5, mode="physical").prune(classifier, tokens(32, 16), torch.Generator())
    after = classifier(ids)
    assert after.shape == before.shape and not torch.allclose(after, before)


def _bert_classifier():
    import transformers

    model = tiny_bert()
    config = model.config
    config.num_labels = 2
    torch.manual_seed(0)
    clf = transformers.BertForSequenceClassification(config)
    return clf.eval()
