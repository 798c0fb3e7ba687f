"""BERT-family text models: the wrapper's contract, offline loading, options and their errors."""

import json

import pytest
import torch
from torch import nn

from fedleak import hf, seeding
from fedleak.core import Batch, ServerView, Task
from fedleak.models import MODELS
from fedleak.models.bert import TextClassifier
from fedleak.registry import ConfigError

pytest.importorskip("transformers")

TINY = {"name": "tiny_bert", "layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}


def text_task(length=12, classes=3):
    return Task("text", (length,), classes, tokenizer=hf.tokenizer_dir())


def build(spec=TINY, task=None, seed=0) -> TextClassifier:
    with seeding.isolated(seed, "model"):
        return MODELS.build(spec)(task or text_task())


def ids(batch=3, length=12, pad_from=(12, 8, 5)):
    """Random word-piece ids in [CLS] ... [SEP] [PAD]* form (the tokenizer's layout)."""
    gen = torch.Generator().manual_seed(0)
    out = torch.randint(1000, 30000, (batch, length), generator=gen)
    out[:, 0] = 101
    for row, end in enumerate(pad_from):
        out[row, end - 1] = 102
        out[row, end:] = 0
    return out


def test_tiny_bert_maps_ids_to_logits_and_embeddings_to_the_same_logits():
    model = build()
    x = ids()
    logits = model(x)
    assert logits.shape == (3, 3) and logits.dtype == torch.float32
    embeds = model.embed(x)
    assert embeds.shape == (3, 12, 32)
    assert torch.allclose(model.forward_embeds(embeds, model.mask(x)), logits, atol=1e-6)
    assert model.pad_id == 0 and model.vocab_size == 30_522 and model.hidden_size == 32
    assert torch.equal(model.mask(x)[1], torch.tensor([1] * 8 + [0] * 4))


def test_padding_is_masked_out():
    model = build()
    x = ids(batch=1, length=12, pad_from=(6,))
    longer = torch.cat([x, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    assert torch.allclose(model(x), model(longer), atol=1e-5)
    # the mask does something: attending to the pads moves the final [CLS] state
    masked = model.hf.bert(input_ids=x, attention_mask=model.mask(x)).last_hidden_state[:, 0]
    unmasked = model.hf.bert(input_ids=x).last_hidden_state[:, 0]
    assert (masked - unmasked).abs().max() > 1e-3  # float error is ~1e-7


def test_pooler_and_classifier_names_resolve_to_the_layers_attacks_hook():
    model = build()
    assert model.pooler_layer == "hf.bert.pooler.dense"
    assert model.classifier_layer == "hf.classifier"
    pooler = model.get_submodule(model.pooler_layer)
    classifier = model.get_submodule(model.classifier_layer)
    assert isinstance(pooler, nn.Linear) and isinstance(classifier, nn.Linear)
    assert classifier.out_features == 3
    seen = {}
    pooler.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
    x = ids()
    model(x)
    last = model.hf.bert(input_ids=x, attention_mask=model.mask(x)).last_hidden_state
    assert torch.allclose(seen["x"], last[:, 0], atol=1e-6)  # the pooler's input: final [CLS]


def test_a_modifier_can_widen_the_pooler_and_the_state_dict_follows():
    model, width = build(), 100
    pooler = model.get_submodule(model.pooler_layer)
    model.hf.bert.pooler.dense = nn.Linear(pooler.in_features, width)
    model.hf.classifier = nn.Linear(width, 3)
    assert model(ids()).shape == (3, 3)
    state = model.state_dict()
    assert state["hf.bert.pooler.dense.weight"].shape == (width, 32)
    copy = build(seed=1)
    copy.hf.bert.pooler.dense, copy.hf.classifier = nn.Linear(32, width), nn.Linear(width, 3)
    copy.load_state_dict(state)
    assert torch.equal(copy(ids()), model(ids()))


def test_state_dict_round_trips_and_builds_are_reproducible():
    before = torch.get_rng_state()
    a, b, c = build(), build(), build(seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(k.startswith("hf.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    c.load_state_dict(sa)
    assert torch.equal(c(ids()), a(ids()))


def test_without_dropout_training_mode_is_deterministic_and_dropout_is_an_option():
    model = build()
    model.train()
    assert torch.equal(model(ids()), model(ids()))
    noisy = build({**TINY, "dropout": 0.5})
    noisy.train()
    assert not torch.equal(noisy(ids()), noisy(ids()))
    noisy.eval()
    assert torch.equal(noisy(ids()), noisy(ids()))


def test_from_local_step_works_and_the_embedding_gradient_shows_the_bag_of_words():
    model, task = build(), text_task()
    x = ids()
    view = ServerView.from_local_step(model, Batch(x, torch.tensor([0, 1, 2])), task)
    grad = view.gradient()["hf.bert.embeddings.word_embeddings.weight"]
    used = set(x.flatten().tolist()) - {0}  # the pad row gets no gradient (padding_idx)
    assert {int(i) for i in grad.abs().sum(1).nonzero()} == used
    restored = view.model()
    assert torch.equal(restored(x), model(x))


def test_gradients_of_gradients_reach_the_embeddings():
    # gradient matching (TAG, LAMP) differentiates a gradient distance w.r.t. input embeddings
    model = build()
    x = ids()
    embeds = model.embed(x).detach().requires_grad_()
    loss = nn.functional.cross_entropy(
        model.forward_embeds(embeds, model.mask(x)), torch.ones(3).long()
    )
    params = [p for n, p in model.named_parameters() if "word_embeddings" not in n]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    (distance,) = torch.autograd.grad(sum(g.square().sum() for g in grads), [embeds])
    assert distance.shape == embeds.shape and distance.abs().sum() > 0


def test_the_bundled_minilm_loads_offline_with_its_pretrained_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    safetensors = pytest.importorskip("safetensors.torch")
    model = build({"name": "bert"}, text_task(classes=2))
    assert model.hf.config.num_hidden_layers == 6 and model.hidden_size == 384
    assert model.vocab_size == 30_522 and model.pad_id == 0
    stored = safetensors.load_file(str(hf.minilm_dir() / "model.safetensors"))
    key = next(k for k in stored if k.endswith("pooler.dense.weight"))
    assert torch.equal(model.get_submodule(model.pooler_layer).weight, stored[key])
    assert model.get_submodule(model.classifier_layer).out_features == 2
    assert model(ids(length=12)).shape == (3, 2)


def test_a_local_model_folder_loads_pretrained_or_with_random_weights(tmp_path):
    original = build()
    original.hf.save_pretrained(tmp_path)
    loaded = build({"name": "bert", "path": str(tmp_path)})
    assert torch.equal(loaded(ids()), original(ids()))  # every weight, the head included
    random = build({"name": "bert", "path": str(tmp_path), "weights": "random"}, seed=1)
    assert random.hidden_size == 32
    assert not torch.equal(random(ids()), original(ids()))
    # a head fine-tuned for other classes is replaced by a new one of the task's size
    two = build({"name": "bert", "path": str(tmp_path)}, text_task(classes=2))
    assert two(ids()).shape == (3, 2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**TINY, "heads": 3}, r"heads=3 must divide hidden=32, e\.g\. heads=2"),
        ({**TINY, "layers": 0}, "layers must be >= 1"),
        ({**TINY, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"name": "bert", "path": "bert-base-uncased"}, "not a local directory.*never downloads"),
        ({"name": "bert", "attention": "flash"}, "attention must be one of 'eager', 'sdpa'"),
    ],
)
def test_bad_options_fail_when_the_config_loads(spec, message):
    with pytest.raises(ConfigError, match=message):
        MODELS.build(spec)


def test_a_folder_without_a_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        MODELS.build({"name": "bert", "path": str(tmp_path)})


def test_text_models_refuse_image_tasks_and_overlong_sequences():
    with pytest.raises(ValueError, match=r"needs text inputs .* image task"):
        MODELS.build(TINY)(Task("image", (1, 8, 8), 10))
    with pytest.raises(ValueError, match="exceed BERT's 512 positions"):
        MODELS.build(TINY)(text_task(length=600))


def test_the_wrapper_refuses_float_inputs_and_ids_outside_the_vocabulary():
    model = build({**TINY, "vocab": 500})
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.randn(2, 12))
    with pytest.raises(ValueError, match="token id 1000 is outside the model's vocabulary of 500"):
        model(torch.full((1, 4), 1000))
