"""Language-model priors over a text task's token ids, for the discrete steps of text attacks.

LAMP (Balunović, Dimitrov, Jovanović & Vechev, NeurIPS 2022) scores candidate reorderings of a
reconstructed sentence by gradient distance plus ``α ×`` the perplexity of an auxiliary language
model that shares the victim's vocabulary (its authors use a GPT-2 trained on WikiText-103 with
BERT's word-pieces, downloaded from their server).  fedleak never downloads, so it builds its
own prior from text it can read offline:

* ``ngram`` -- an interpolated Kneser–Ney n-gram model (Chen & Goodman 1998, "An empirical study
  of smoothing techniques") over the task tokenizer's word-pieces, estimated from a corpus:
  WikiText-2 (``wiki.*.raw``) in the data root ``$FEDLEAK_DATA_ROOT`` by default, any
  ``.txt``/``.raw``/``.tsv`` files, or the bundled demo corpus.  Built in seconds and cached on
  disk (``~/.cache/fedleak`` by default).  Without a corpus it falls back to ``none``, with a
  warning.
* ``none`` -- a constant prior: every sequence scores 0 (LAMP without its language model).

A prior is a dataclass registered in :data:`PRIORS`; ``PRIORS[name](**options).load(tokenizer)``
returns a :class:`Scorer` whose ``nll(ids, lengths)`` is batched over candidate sequences.

Threat model: the prior is the attacker's public knowledge of the language and must not be
estimated from the clients' data.  The demo corpus is also fedleak's ``demo_text`` data set, so
a prior built on it has seen the sentences it then helps recover: it is used only when asked for
by name (``corpus = "demo"``), and loading it logs a warning that says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from fedleak import hf
from fedleak.registry import Registry

log = logging.getLogger(__name__)

PRIORS: Registry = Registry("language prior")
CACHE_ENV = "FEDLEAK_CACHE"  # overrides the default cache folder ~/.cache/fedleak
DATA_ROOT_ENV = "FEDLEAK_DATA_ROOT"  # where corpus = "" looks for WikiText-2
WIKITEXT = ("wiki.test.raw", "wiki.train.raw", "wikitext-2-raw/wiki.test.raw")
_FORMAT = 1  # bump when the cached arrays change meaning


@runtime_checkable
class Scorer(Protocol):
    """A loaded prior: how unlikely each candidate token sequence is."""

    def nll(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Summed negative log-likelihood (nats) ``[K]`` of each row of ``ids`` ``[K, T]``.

        Row ``k`` is ``[CLS] w_1 … w_n [SEP]`` followed by anything, with ``lengths[k] = n + 2``;
        the tokens at positions ``1 … lengths[k] - 1`` (the words and ``[SEP]``) are scored,
        each given the ones before it.  Returned on the CPU as float64, whatever the device of
        ``ids`` (the tables are looked up there); the caller moves the scores.
        """


@PRIORS.register("none")
@dataclass
class NoPrior:
    """A constant prior: every sequence scores 0 (an attack without a language model)."""

    def load(self, tokenizer: str = "") -> Scorer:
        """This prior itself: it needs no tokenizer and no data."""
        return self

    def nll(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Zeros ``[K]``."""
        return torch.zeros(len(ids), dtype=torch.float64)


@PRIORS.register("ngram")
@dataclass
class NGram:
    """Interpolated Kneser–Ney n-gram model over word-pieces, estimated from a text corpus."""

    order: int = 3  # n: 2 = bigram, 3 = trigram, 4 at most
    discount: float = 0.75  # absolute discount D of Kneser–Ney, in (0, 1)
    # text files (.txt/.raw: one passage per line; .tsv: a sentence or text column), a folder of
    # them, "demo" (the bundled corpus), or "" = WikiText-2 in $FEDLEAK_DATA_ROOT (else no prior)
    corpus: str = ""
    cache: str = ""  # cache folder; "" = $FEDLEAK_CACHE or ~/.cache/fedleak; "off" = no cache

    def __post_init__(self) -> None:
        if not 2 <= self.order <= 4:
            raise ValueError(f"ngram prior: order must be 2, 3 or 4, got {self.order}")
        if not 0 < self.discount < 1:
            raise ValueError(f"ngram prior: discount must be in (0, 1), got {self.discount}")
        if self.corpus and self.corpus != "demo" and not Path(self.corpus).expanduser().exists():
            raise ValueError(
                f"ngram prior: corpus {self.corpus!r} does not exist; give a text file, a folder "
                "of .txt/.raw/.tsv files, 'demo', or '' for WikiText-2 in $FEDLEAK_DATA_ROOT"
            )

    def load(self, tokenizer: str = "") -> Scorer:
        """The model for ``tokenizer`` (a local folder; "" = the bundled MiniLM's), cached.

        With ``corpus = ""`` and no WikiText-2 in ``$FEDLEAK_DATA_ROOT``: no prior, and a
        warning.
        """
        files = corpus_files(self.corpus)
        if files is None:
            return NoPrior()
        return _load(
            tuple(str(f) for f in files),
            hf.tokenizer_dir(tokenizer),
            self.order,
            self.discount,
            self.cache,
        )


def corpus_files(corpus: str) -> list[Path] | None:
    """The files a ``corpus`` option names (``[]`` = the bundled demo corpus, None = none)."""
    if corpus == "demo":
        log.warning(
            "ngram prior: the demo corpus is also the demo_text data set: attacks on demo_text "
            "then use a prior that has seen the clients' sentences"
        )
        return []
    if corpus:
        path = Path(corpus).expanduser()
        if path.is_file():
            return [path]
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".raw", ".tsv"))
        if not files:
            raise FileNotFoundError(f"ngram prior: no .txt, .raw or .tsv files under {path}")
        return files
    root = os.environ.get(DATA_ROOT_ENV, "")
    for name in WIKITEXT if root else ():
        if (Path(root) / name).is_file():
            return [Path(root) / name]
    log.warning(
        "ngram prior: no WikiText-2 (%s) under $%s; running without a language prior. Set %s "
        "or the attack's corpus option to a text file",
        " or ".join(WIKITEXT),
        DATA_ROOT_ENV,
        DATA_ROOT_ENV,
    )
    return None


def read_corpus(files: list[Path]) -> list[str]:
    """The passages of the corpus files (the demo corpus's sentences when ``files`` is empty)."""
    from fedleak.data import text  # the TSV reader; imported here to keep lm import-light

    if not files:
        demo = resources.files("fedleak.data").joinpath(text.DEMO_FILE).read_text("utf-8")
        return text.parse(demo, text.DEMO_FILE)[0]
    passages: list[str] = []
    for path in files:
        if path.suffix == ".tsv":
            passages += text.read_tsv(path)[0]
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or (line.startswith("=") and line.endswith("=")):  # WikiText headings
                continue
            # WikiText escapes in-word punctuation as " @-@ "; BERT's tokenizer wants it joined.
            line = re.sub(r" @(.)@ ", r"\1", line).replace("<unk>", "")
            passages += [s for s in re.split(r"(?<=[.!?])\s+", line) if s]
    return passages


@lru_cache(maxsize=4)
def _load(
    files: tuple[str, ...], tokenizer: str, order: int, discount: float, cache: str
) -> NGramModel:
    """Build (or read from the cache) the n-gram model of ``files`` under ``tokenizer``."""
    paths = [Path(f) for f in files]
    digest = hashlib.sha256(repr((_FORMAT, order, discount)).encode())
    for path in paths:
        digest.update(path.read_bytes())
    if not paths:
        digest.update(b"demo")
    digest.update(_vocab_digest(tokenizer).encode())
    folder = None if cache == "off" else _cache_dir(cache)
    target = folder / f"ngram-{order}-{digest.hexdigest()[:16]}.npz" if folder else None
    if target is not None and target.is_file():
        with np.load(target) as stored:
            return NGramModel({k: stored[k] for k in stored.files}, order, discount)
    tok = hf.tokenizer(tokenizer)
    passages = read_corpus(paths)
    encoded = tok(passages, truncation=True, max_length=512)["input_ids"]
    arrays = _estimate(encoded, order, len(tok), int(tok.cls_token_id))
    log.info(
        "ngram prior: %d-gram model of %d passages (%d tokens) built%s",
        order,
        len(passages),
        sum(len(e) for e in encoded),
        f", cached in {target}" if target else "",
    )
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, target)
    return NGramModel(arrays, order, discount)


def _cache_dir(cache: str) -> Path:
    if cache:
        return Path(cache).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedleak")


def _vocab_digest(tokenizer: str) -> str:
    """A fingerprint of the tokenizer's vocabulary (ids change meaning with it)."""
    vocab = hf.tokenizer(tokenizer).get_vocab()
    return hashlib.sha256(repr(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


def _estimate(sequences: list[list[int]], order: int, vocab: int, bos: int) -> dict[str, Array]:
    """Counts of interpolated Kneser–Ney: per level k = 1..n, sorted keys and their statistics.

    Level n uses raw counts c(h, w); lower levels use continuation counts N1+(• h w) (how many
    distinct tokens precede the k-gram), as Kneser–Ney prescribes.  For every level: the k-gram
    keys with their count, and the (k-1)-gram context keys with the count total and the number
    of distinct continuations N1+(h •).  Keys pack token ids in base ``vocab`` (int64).
    """
    if vocab**order >= 2**63:
        raise ValueError(f"ngram prior: a vocabulary of {vocab} is too large for order {order}")
    # Every sequence starts with [CLS]; n - 2 more of them give the first words full contexts.
    pad = [bos] * (order - 2)
    stream = [np.asarray(pad + s, dtype=np.int64) for s in sequences if len(s) >= 2]
    grams = np.concatenate(
        [np.lib.stride_tricks.sliding_window_view(s, order) for s in stream if len(s) >= order]
    )
    keys, counts = np.unique(_pack(grams, vocab), return_counts=True)
    arrays: dict[str, Array] = {}
    for k in range(order, 0, -1):
        arrays[f"keys{k}"], arrays[f"count{k}"] = keys, counts.astype(np.float64)
        context = keys // vocab  # the k-gram's first k-1 tokens
        ctx, where = np.unique(context, return_inverse=True)
        arrays[f"ctx{k}"] = ctx
        arrays[f"total{k}"] = np.bincount(where, weights=counts).astype(np.float64)
        arrays[f"types{k}"] = np.bincount(where).astype(np.float64)  # N1+(h •)
        if k > 1:
            # continuation counts of the (k-1)-grams: distinct predecessors of each suffix
            keys, counts = np.unique(keys % vocab ** (k - 1), return_counts=True)
    arrays["vocab"] = np.asarray([vocab, bos], dtype=np.int64)
    return arrays


Array = np.ndarray


def _pack(grams: Array, vocab: int) -> Array:
    key = np.zeros(len(grams), dtype=np.int64)
    for column in range(grams.shape[1]):
        key = key * vocab + grams[:, column]
    return key


class NGramModel:
    """A loaded Kneser–Ney model: batched scoring of token-id sequences (see :class:`Scorer`)."""

    def __init__(self, arrays: dict[str, Array], order: int, discount: float) -> None:
        self.order, self.discount = order, discount
        self.vocab, self.bos = (int(x) for x in arrays["vocab"])
        self.levels = [
            {
                name: torch.from_numpy(np.ascontiguousarray(arrays[f"{name}{k}"]))
                for name in ("keys", "count", "ctx", "total", "types")
            }
            for k in range(1, order + 1)
        ]

    def nll(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Summed negative log-likelihood ``[K]`` of positions ``1 … lengths - 1`` of each row."""
        ids = ids.detach().cpu().long()
        lengths = lengths.detach().cpu().long()
        k_rows, width = ids.shape
        pad = ids.new_full((k_rows, self.order - 2), self.bos)
        padded = torch.cat([pad, ids], dim=1)  # position p of ids is column p + n - 2
        # The n-gram ending at each scored position: [K, T - 1, n].
        grams = padded.unfold(1, self.order, 1)[:, : width - 1]
        prob = torch.full(grams.shape[:2], 1.0 / self.vocab, dtype=torch.float64)
        for k, level in enumerate(self.levels, start=1):
            tail = grams[..., self.order - k :]
            key = torch.zeros(grams.shape[:2], dtype=torch.long)
            for column in range(k):
                key = key * self.vocab + tail[..., column]
            count = _lookup(level["keys"], level["count"], key)
            context = key // self.vocab
            total = _lookup(level["ctx"], level["total"], context)
            types = _lookup(level["ctx"], level["types"], context)
            seen = total > 0
            safe = total.clamp_min(1e-300)
            mixed = (count - self.discount).clamp_min(0) / safe
            mixed = mixed + self.discount * types / safe * prob
            prob = torch.where(seen, mixed, prob)
        scored = torch.arange(1, width)[None, :] < lengths[:, None]
        return -(prob.log() * scored).sum(1)


def _lookup(keys: Tensor, values: Tensor, query: Tensor) -> Tensor:
    """``values`` at ``query``'s positions in the sorted ``keys``; 0 where absent."""
    if len(keys) == 0:
        return torch.zeros(query.shape, dtype=torch.float64)
    index = torch.searchsorted(keys, query).clamp_max(len(keys) - 1)
    return torch.where(keys[index] == query, values[index], torch.zeros((), dtype=values.dtype))
