"""Tiny random Llama (GQA) and BERT models for the pruning tests."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """2 blocks, hidden 64, 4 query heads over 2 key/value heads, SwiGLU 128."""
    config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    return model.eval()


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """2 blocks, hidden 64, 4 heads, FFN 128."""
    config = transformers.BertConfig(
        vocab_size=101,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.BertModel(config, add_pooling_layer=False)
    model.config._attn_implementation = "eager"
    return model.eval()


def tokens(n: int = 16, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=["llama", "bert"])
def build(request):
    return tiny_llama if request.param == "llama" else tiny_bert
