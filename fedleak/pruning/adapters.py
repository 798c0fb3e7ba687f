"""Model adapters: the prunable structure of a transformer block, whatever library built it.

Every structured pruner works on *depth-2 modules* (GOA's word; Li, Dong & Lei, CPAL 2025):

* attention: level 1 = the q, k, v projections, level 2 = the output projection; pruned in whole
  heads (head_dim rows of q/k/v, head_dim columns of o);
* FFN: level 1 = the up projection (and the gate, for a gated FFN), level 2 = the down
  projection; pruned in inner channels (rows of level 1, columns of level 2).

The residual width never changes, so every block keeps its own indices.  An adapter finds, per
block, the layers and their sizes, and runs one block on cached inputs (the keyword arguments
the model passed to its first block are captured once and reused: see
:mod:`fedleak.pruning.calibration`).

Covered: Hugging Face Llama-like decoders (``model.model.layers``; grouped-query attention:
``num_key_value_heads`` key/value heads, each shared by a group of query heads) and BERT-like
encoders (``bert.encoder.layer``, also inside fedleak's :class:`TextClassifier`).  Anything else
is one clear error.  ``torch-pruning`` (VainF, 1.6.1) is not used for the physical removal: on
this project's transformers 5.25 its ``MetaPruner`` with ``num_heads`` / ``prune_num_heads``
failed on a tiny HF BERT (``IndexError`` in ``ops.OutputPruner.prune_out_channels``: its traced
graph ties the pruned channels to the model's output, whose width must not change), and on a
tiny 2-block GQA Llama it had not returned (graph building and one step) after 900 s; its GQA
handling is also the known sore point (Torch-Pruning issue #495).  The removal here is a
handful of index selects on known layers, tested against the mask mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Attention:
    """One block's attention as a depth-2 module."""

    module: nn.Module  # the HF attention module whose head counts are updated on removal
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    heads: int  # query heads
    kv_heads: int  # key/value heads (== heads without GQA)
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def kv_of(self, head: int) -> int:
        """The key/value head that query head ``head`` reads."""
        return head // self.group


@dataclass
class FFN:
    """One block's feed-forward network as a depth-2 module."""

    level1: list[nn.Linear]  # [gate, up] for a gated FFN, [up] otherwise
    down: nn.Linear
    act: Callable[[Tensor], Tensor]
    gated: bool

    @property
    def channels(self) -> int:
        """Inner channels (rows of level 1)."""
        return self.down.in_features

    def inner(self, outputs: list[Tensor]) -> Tensor:
        """The down projection's input from the level-1 outputs."""
        if self.gated:
            return self.act(outputs[0]) * outputs[1]
        return self.act(outputs[0])


@dataclass
class Block:
    """One transformer block: its module, attention and FFN."""

    index: int
    module: nn.Module
    attn: Attention
    ffn: FFN


class Adapter:
    """Where a model's blocks are, how it embeds, and how its attention is reshaped."""

    kind = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def blocks(self) -> list[Block]:
        """The model's blocks, in order."""
        raise NotImplementedError

    def first_block(self) -> nn.Module:
        """The module whose inputs the calibration catcher captures."""
        return self.blocks()[0].module

    def set_heads(self, attn: Attention, heads: int, kv_heads: int) -> None:
        """Record new head counts on the attention module after a physical removal."""
        raise NotImplementedError

    def forward(self, ids: Tensor) -> Tensor:
        """Run the whole model (what the calibration catcher interrupts)."""
        raise NotImplementedError


class LlamaAdapter(Adapter):
    """Hugging Face Llama-like decoders (Llama, SmolLM2, Mistral, Qwen2): GQA, SwiGLU."""

    kind = "llama"

    def blocks(self) -> list[Block]:
        """The model's blocks, in order."""
        out = []
        for i, layer in enumerate(self.model.model.layers):
            a, m = layer.self_attn, layer.mlp
            head_dim = a.head_dim
            heads = a.q_proj.out_features // head_dim
            kv_heads = a.k_proj.out_features // head_dim
            attn = Attention(a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, heads, kv_heads, head_dim)
            ffn = FFN([m.gate_proj, m.up_proj], m.down_proj, m.act_fn, gated=True)
            out.append(Block(i, layer, attn, ffn))
        return out

    def set_heads(self, attn: Attention, heads: int, kv_heads: int) -> None:
        """Record new head counts on the attention module after a physical removal."""
        # HF's Llama attention reshapes with -1 heads and repeats k/v by num_key_value_groups.
        attn.module.num_key_value_groups = heads // kv_heads

    def forward(self, ids: Tensor) -> Tensor:
        """Run the whole model on token ids (what the calibration catcher interrupts)."""
        return self.model(input_ids=ids, use_cache=False)


class BertAdapter(Adapter):
    """Hugging Face BERT-like encoders (BERT, MiniLM; also inside fedleak's TextClassifier)."""

    kind = "bert"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.hf = model.hf if hasattr(model, "hf") and hasattr(model, "pad_id") else model

    def blocks(self) -> list[Block]:
        """The model's blocks, in order."""
        encoder = _base(self.hf).encoder
        out = []
        for i, layer in enumerate(encoder.layer):
            s = layer.attention.self
            head_dim = s.attention_head_size
            heads = s.query.out_features // head_dim
            attn = Attention(
                s, s.query, s.key, s.value, layer.attention.output.dense, heads, heads, head_dim
            )
            act = layer.intermediate.intermediate_act_fn
            ffn = FFN([layer.intermediate.dense], layer.output.dense, act, gated=False)
            out.append(Block(i, layer, attn, ffn))
        return out

    def set_heads(self, attn: Attention, heads: int, kv_heads: int) -> None:
        """Record new head counts on the attention module after a physical removal."""
        attn.module.num_attention_heads = heads
        attn.module.all_head_size = heads * attn.head_dim

    def forward(self, ids: Tensor) -> Tensor:
        """Run the whole model on token ids (what the calibration catcher interrupts)."""
        if self.hf is not self.model:
            return self.model(ids)
        return self.hf(input_ids=ids)


def adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or a ValueError naming its type and the covered ones."""
    inner = model.hf if hasattr(model, "hf") and hasattr(model, "pad_id") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", type(model).__name__)
    if hasattr(inner, "model") and hasattr(inner.model, "layers"):
        layer = inner.model.layers[0]
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj"):
            return LlamaAdapter(inner)
    encoder = getattr(_base(inner), "encoder", None)
    if encoder is not None and hasattr(getattr(encoder, "layer", [None])[0], "attention"):
        return BertAdapter(model)
    raise ValueError(
        f"pruning: no adapter for model type {model_type!r} ({type(model).__name__}); covered: "
        "Llama-like decoders (model.model.layers with q/k/v/o_proj and a gated MLP) and "
        "BERT-like encoders (bert.encoder.layer)"
    )


def _base(model: nn.Module) -> nn.Module:
    """The base model of a Hugging Face head model (``model.bert``), or the model itself."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


@torch.no_grad()
def keep_rows(linear: nn.Linear, keep: Tensor) -> None:
    """Physically keep only the output channels ``keep`` of ``linear``."""
    linear.weight = nn.Parameter(linear.weight[keep].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[keep].clone())
    linear.out_features = len(keep)


@torch.no_grad()
def keep_columns(linear: nn.Linear, keep: Tensor) -> None:
    """Physically keep only the input channels ``keep`` of ``linear``."""
    linear.weight = nn.Parameter(linear.weight[:, keep].clone())
    linear.in_features = len(keep)


# Which tensor entries a head / channel owns, from the state_dict names alone: what a server
# needs to put a client's pruned model back in the global shape.  (suffix, axis, unit)
_LLAMA = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.")
_BERT = re.compile(
    r"(?:^|\.)layer\.(\d+)\.(attention\.self\.(?:query|key|value)|attention\.output\.dense|"
    r"intermediate\.dense|output\.dense)\."
)
_ROLES = {  # layer -> (unit, axis of the weight the unit indexes)
    "self_attn.q_proj": ("head", 0),
    "self_attn.k_proj": ("kv", 0),
    "self_attn.v_proj": ("kv", 0),
    "self_attn.o_proj": ("head", 1),
    "mlp.gate_proj": ("channel", 0),
    "mlp.up_proj": ("channel", 0),
    "mlp.down_proj": ("channel", 1),
    "attention.self.query": ("head", 0),
    "attention.self.key": ("head", 0),
    "attention.self.value": ("head", 0),
    "attention.output.dense": ("head", 1),
    "intermediate.dense": ("channel", 0),
    "output.dense": ("channel", 1),
}


def entry_masks(
    params: dict[str, Tensor], head_mask: Tensor, channel_mask: Tensor
) -> dict[str, Tensor]:
    """Per tensor of a Llama-like or BERT-like state, the entries the kept structure owns.

    ``head_mask [blocks, heads]`` and ``channel_mask [blocks, channels]`` (True / 1 = kept) in
    the global model's coordinates.  Returns a boolean mask broadcastable to each tensor a
    pruned head or channel touches (q/k/v rows and their biases, o columns; level-1 rows and
    biases, down columns); tensors no head or channel owns (norms, embeddings, level-2 biases)
    are absent.  A key/value head is kept while any query head of its group is.
    """
    heads, channels = head_mask.bool(), channel_mask.bool()
    out = {}
    for name, tensor in params.items():
        match = _LLAMA.search(name) or _BERT.search(name)
        if match is None:
            continue
        unit, axis = _ROLES[match.group(2)]
        if name.endswith(".bias") and axis == 1:
            continue  # a level-2 bias belongs to every channel
        block = int(match.group(1))
        size = tensor.shape[axis] if tensor.ndim == 2 else tensor.shape[0]
        if unit == "channel":
            keep = channels[block]
        elif unit == "head":
            keep = heads[block].repeat_interleave(size // heads.shape[1])
        else:  # k/v rows of a GQA model: the head size comes from q
            q = params[name.replace(match.group(2), "self_attn.q_proj")]
            head_dim = q.shape[0] // heads.shape[1]
            kv = heads[block].reshape(size // head_dim, -1).any(1)
            keep = kv.repeat_interleave(head_dim)
        out[name] = keep.view(-1, 1) if axis == 0 and tensor.ndim == 2 else keep
    return out
