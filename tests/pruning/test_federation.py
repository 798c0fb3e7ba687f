"""Pruning in the federation: masked FedAvg, the client pruning trainer, the server modifier."""

from __future__ import annotations

import re

import pytest
import torch

from fedleak.core import Batch, Reply
from fedleak.modifiers import MODIFIERS
from fedleak.pruning.adapters import entry_masks
from fedleak.registry import ConfigError
from fedleak.server import SERVER_STRATEGIES
from fedleak.training import TRAINERS
from tests.pruning.conftest import tiny_llama, tokens


def _classifier():
    import transformers

    from fedleak.models.bert import TextClassifier

    config = transformers.BertConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf = transformers.BertForSequenceClassification(config)
    hf.config._attn_implementation = "eager"
    return TextClassifier(hf, pad_id=0, pooler_layer="", classifier_layer="hf.classifier")


def test_entry_masks_cover_gqa_heads_and_channels():
    state = tiny_llama().state_dict()
    heads = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)  # block 0: group 1 gone
    channels = torch.ones(2, 128)
    channels[1, :5] = 0
    masks = entry_masks(state, heads, channels)
    q = masks["model.layers.0.self_attn.q_proj.weight"].squeeze(1)
    assert q.tolist() == [True] * 16 + [False] * 48  # head_dim 16
    k = masks["model.layers.0.self_attn.k_proj.weight"].squeeze(1)
    assert k.tolist() == [True] * 16 + [False] * 16  # k/v head 1 has no query head left
    assert masks["model.layers.0.self_attn.o_proj.weight"].shape == (64,)
    assert masks["model.layers.1.mlp.down_proj.weight"][:5].tolist() == [False] * 5
    assert "model.layers.0.input_layernorm.weight" not in masks


def test_masked_fedavg_averages_each_weight_over_the_clients_that_kept_it():
    model = _classifier()
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    name = "hf.bert.encoder.layer.0.intermediate.dense.weight"
    a = {k: v + 1 for k, v in glob.items() if v.is_floating_point()}
    b = {k: v + 3 for k, v in glob.items() if v.is_floating_point()}
    a = {**glob, **a}
    b = {**glob, **b}
    heads, channels = torch.ones(2, 4), torch.ones(2, 64)
    pruned = channels.clone()
    pruned[0, 0] = 0  # A dropped channel 0 of block 0
    both = channels.clone()
    both[0, 1] = 0
    pruned[0, 1] = 0  # neither kept channel 1
    replies = [
        Reply(0, a, 1, 0.0, {"head_mask": heads, "channel_mask": pruned}),
        Reply(1, b, 3, 0.0, {"head_mask": heads, "channel_mask": both}),
    ]
    out = SERVER_STRATEGIES["masked_fedavg"]().aggregate(1, glob, replies)
    assert torch.allclose(out[name][0], glob[name][0] + 3)  # only B kept it
    assert torch.allclose(out[name][1], glob[name][1])  # nobody: the global value stays
    assert torch.allclose(out[name][2], glob[name][2] + 2.5)  # both: (1 * 1 + 3 * 3) / 4
    norm = "hf.bert.embeddings.LayerNorm.weight"
    assert torch.allclose(out[norm], glob[norm] + 2.5)  # tensors nobody prunes: FedAvg


def test_prune_trainer_sends_its_masks_and_zeros_the_pruned_entries():
    model = _classifier()
    data = Batch(tokens(24, 12), torch.randint(2, (24,), generator=torch.Generator()))
    trainer = TRAINERS["prune"](
        lr=0.01, batch_size=8, pruner={"name": "flap", "ratio": 0.5}, send_scores=True
    )
    result = trainer.fit(model, data, torch.nn.functional.cross_entropy, torch.Generator())
    assert set(result.messages) == set(trainer.sends)
    assert result.messages["head_mask"].sum(1).tolist() == [2, 2]
    masks = entry_masks(
        model.state_dict(),
        **{k: result.messages[k] for k in trainer.sends if k != "channel_scores"},
    )
    state = model.state_dict()
    for name, keep in masks.items():
        dropped = ~keep.expand_as(state[name]) if state[name].ndim == 2 else ~keep
        assert not state[name][dropped].any(), name


def test_prune_model_modifier_prunes_the_sent_state_in_mask_mode():
    model = _classifier()
    modifier = MODIFIERS["prune_model"](pruner={"name": "goa", "ratio": 0.5, "refit": False})
    modifier.architecture(model)
    params = model.state_dict()
    sent, secrets = modifier(params, 1, torch.Generator().manual_seed(0))
    assert secrets == {} and all(sent[k].shape == v.shape for k, v in params.items())
    down = "hf.bert.encoder.layer.1.output.dense.weight"
    assert (sent[down].abs().sum(0) == 0).sum() == 32  # half of the 64 channels zeroed


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("training", {"pruner": {"name": "sparsegpt"}}, "is unstructured"),
        ("training", {"pruner": {"name": "goa", "mode": "physical"}}, "mode must be 'mask'"),
        ("training", {"pruner": {"name": "goa", "ratio": 2}}, "ratio must be in [0, 1)"),
        ("modifier", {"pruner": {"name": "gao"}}, "Did you mean 'goa'"),
        ("modifier", {"pruner": {"name": "goa"}, "calibration": "none"}, "scores on data"),
    ],
)
def test_bad_options_are_one_clear_error(kind, options, message):
    registry = TRAINERS if kind == "training" else MODIFIERS
    name = "prune" if kind == "training" else "prune_model"
    with pytest.raises((ValueError, ConfigError), match=re.escape(message)):
        registry.build({"name": name, **options})
