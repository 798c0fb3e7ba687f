"""A TextFooler-style greedy word-substitution attack that runs offline.

Jin, Jin, Zhou & Szolovits, "Is BERT Really Robust? A Strong Baseline for Natural Language
Attack on Text Classification and Entailment", AAAI 2020.  Black box: the attacker queries the
victim's class probabilities only.

For one correctly classified sentence (words = whitespace tokens):

1. *Word importance by deletion*: ``I_i = p_y(x) − p_y(x without word i)``, plus, when deleting
   the word changes the prediction to ``ŷ``, ``p_ŷ(x without i) − p_ŷ(x)`` (TextFooler's Eq. 2).
2. In decreasing importance, skipping stop words, each word is replaced by its nearest
   neighbours in an embedding table (``candidates`` of them with cosine ≥ ``word_similarity``),
   keeping only those of the same coarse part of speech.  The candidate sentences are queried
   in one batch; those below ``sentence_similarity`` to the original (cosine of sentence
   embeddings) are discarded.  If some flip the prediction, the most similar one is returned;
   otherwise the substitution that lowers ``p_y`` most is kept and the next word is tried.
3. At most ``max_changed`` words (and ``max_fraction`` of the sentence) are changed; the attack
   fails when the cap or the words run out.

Offline resources and departures from TextFooler:

* substitutes: whole-word tokens of the bundled MiniLM's WordPiece vocabulary, ranked by the
  cosine of its *input* word embeddings (TextFooler: counter-fitted GloVe vectors, which push
  antonyms apart; MiniLM's embeddings do not, so a substitute can be an antonym — the sentence
  similarity check is the only guard, as in TextFooler when a neighbour slips through);
* sentence similarity: the pretrained all-MiniLM-L6-v2 sentence encoder (mean pooling,
  normalised), on the whole sentence (TextFooler: the Universal Sentence Encoder on a window of
  15 words around the change, threshold 0.84);
* part of speech: a context-free coarse tag from the word's suffix (adverb, verb form,
  adjective, noun; unknown otherwise), and a swap is refused only when both words have a tag and
  the tags differ (TextFooler: NLTK's perceptron tagger in context).

Every returned adversarial sentence was predicted by the victim as a class other than the
label (the attack never reports a flip it did not observe), and changes at most the cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from fedleak import hf

Predict = Callable[[list[str]], Tensor]  # sentences -> class probabilities [B, C]
Encode = Callable[[list[str]], Tensor]  # sentences -> unit sentence embeddings [B, d]

# Function words TextFooler leaves alone (a list of common English ones, written for fedleak).
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    's 're 've 'd 'll n't -- , . ! ? ; : ' " ( ) - ... `` ''""".split()  # noqa: SIM905
)

_SUFFIXES = (  # (suffix, coarse tag), longest first within a tag
    ("ly", "adv"),
    ("ing", "verb"),
    ("ed", "verb"),
    ("tion", "noun"),
    ("sion", "noun"),
    ("ness", "noun"),
    ("ment", "noun"),
    ("ity", "noun"),
    ("ism", "noun"),
    ("ous", "adj"),
    ("ful", "adj"),
    ("less", "adj"),
    ("able", "adj"),
    ("ible", "adj"),
    ("ive", "adj"),
    ("ic", "adj"),
)


def coarse_pos(word: str) -> str:
    """A context-free coarse part of speech from the suffix ("" when it says nothing)."""
    for suffix, tag in _SUFFIXES:
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return tag
    return ""


def same_pos(a: str, b: str) -> bool:
    """Whether ``b`` may replace ``a``: refused only when both have a tag and they differ."""
    ta, tb = coarse_pos(a), coarse_pos(b)
    return not (ta and tb and ta != tb)


class Neighbours:
    """Nearest whole words by cosine in a word-embedding table (the substitute source)."""

    def __init__(self, words: Sequence[str], embeddings: Tensor) -> None:
        if len(words) != len(embeddings):
            raise ValueError(f"neighbours: {len(words)} words but {len(embeddings)} embeddings")
        keep = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 1]
        self.words = [words[i] for i in keep]
        self.index = {w: i for i, w in enumerate(self.words)}
        unit = embeddings[keep].float()
        self.unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @classmethod
    def minilm(cls) -> Neighbours:
        """The bundled MiniLM's WordPiece vocabulary and input word embeddings."""
        return _minilm_neighbours()

    def of(self, word: str, count: int, threshold: float) -> list[tuple[str, float]]:
        """Up to ``count`` other whole words with cosine ≥ ``threshold``, nearest first."""
        i = self.index.get(word)
        if i is None:
            return []
        sims = self.unit @ self.unit[i]
        sims[i] = -2
        top = sims.topk(min(count, len(sims) - 1))
        return [
            (self.words[j], float(s))
            for s, j in zip(top.values, top.indices.tolist(), strict=True)
            if s >= threshold
        ]


@lru_cache(maxsize=1)
def _minilm_neighbours() -> Neighbours:
    safetensors = hf.require("safetensors.torch", "the word-substitution attack")
    folder = hf.minilm_dir()
    tensors = safetensors.load_file(str(folder / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    words = Path(folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return Neighbours(words[: len(tensors[key])], tensors[key])


def minilm_encoder(batch: int = 64) -> Encode:
    """The pretrained all-MiniLM-L6-v2 as a sentence encoder: mean-pooled, unit-norm."""
    transformers = hf.require("transformers", "the word-substitution attack")
    folder = str(hf.minilm_dir())
    with hf.quiet():
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tok = hf.tokenizer()

    @torch.no_grad()
    def encode(sentences: list[str]) -> Tensor:
        out = []
        for s in range(0, len(sentences), batch):
            enc = tok(sentences[s : s + batch], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out.append(nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    return encode


def classifier_predict(model: nn.Module, max_len: int, batch: int = 64) -> Predict:
    """Class probabilities of fedleak's text classifier on raw sentences (eval mode)."""
    tok = hf.tokenizer()

    @torch.no_grad()
    def predict(sentences: list[str]) -> Tensor:
        model.eval()
        out = []
        for s in range(0, len(sentences), batch):
            enc = tok(
                sentences[s : s + batch],
                padding="max_length",
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            out.append(torch.softmax(model(enc["input_ids"]), -1))
        return torch.cat(out)

    return predict


@dataclass(frozen=True)
class Outcome:
    """One sentence attacked."""

    status: str  # "skipped" (misclassified clean) | "success" | "failure"
    adversarial: str  # the adversarial sentence ("" unless success)
    changed: int  # words changed in it
    words: int  # words in the original
    queries: int  # victim queries spent


@dataclass
class WordSubstitution:
    """Greedy word substitution with deletion importance (TextFooler), offline resources."""

    candidates: int = 50  # nearest neighbours tried per word (TextFooler's 50)
    # Least cosine of a substitute to the word.  TextFooler's 0.5 is for counter-fitted vectors,
    # whose synonyms sit at 0.7-0.9; MiniLM's input embeddings put them at 0.4-0.8.
    word_similarity: float = 0.4
    sentence_similarity: float = 0.8  # least cosine of the sentence embeddings (0: no check)
    max_changed: int = 5  # cap on words changed
    max_fraction: float = 0.3  # ... and on the fraction of the sentence's words changed
    pos_filter: bool = True  # refuse substitutes of another coarse part of speech
    neighbours: Neighbours | None = field(default=None, repr=False)  # None: the MiniLM's
    encoder: Encode | None = field(default=None, repr=False)  # None: the MiniLM's (if checked)

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f"word substitution: candidates must be >= 1, got {self.candidates}")
        if self.max_changed < 1:
            raise ValueError(f"word substitution: max_changed must be >= 1, got {self.max_changed}")
        if not 0 < self.max_fraction <= 1:
            raise ValueError(
                f"word substitution: max_fraction must be in (0, 1], got {self.max_fraction}"
            )
        for name in ("word_similarity", "sentence_similarity"):
            if not -1 <= getattr(self, name) <= 1:
                raise ValueError(f"word substitution: {name} must be a cosine in [-1, 1]")

    def cap(self, words: int) -> int:
        """Words this attack may change in a sentence of ``words`` words (at least one)."""
        return max(1, min(self.max_changed, math.floor(self.max_fraction * words)))

    def attack(self, predict: Predict, sentence: str, label: int) -> Outcome:
        """Attack one sentence whose true class is ``label``."""
        neighbours = self.neighbours or Neighbours.minilm()
        if self.sentence_similarity > 0 and self.encoder is None:
            self.encoder = minilm_encoder()
        words = sentence.split()
        probs = predict([sentence])[0]
        queries = 1
        if int(probs.argmax()) != label or not words:
            return Outcome("skipped", "", 0, len(words), queries)
        deleted = [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
        p_del = predict(deleted)
        queries += len(deleted)
        importance = probs[label] - p_del[:, label]
        new = p_del.argmax(1)
        flipped = new != label
        gain = p_del[torch.arange(len(words)), new] - probs[new]
        importance = importance + torch.where(flipped, gain, torch.zeros_like(gain))
        order = importance.argsort(descending=True).tolist()
        reference = self.encoder([sentence])[0] if self.sentence_similarity > 0 else None
        current, changed, p_label = list(words), set(), float(probs[label])
        for i in order:
            if len(changed) >= self.cap(len(words)):
                break
            word = words[i]
            if word in STOP_WORDS:
                continue
            subs = [
                w
                for w, _ in neighbours.of(word, self.candidates, self.word_similarity)
                if w not in STOP_WORDS and (not self.pos_filter or same_pos(word, w))
            ]
            if not subs:
                continue
            trials = [" ".join([*current[:i], w, *current[i + 1 :]]) for w in subs]
            p = predict(trials)
            queries += len(trials)
            ok = torch.ones(len(trials), dtype=torch.bool)
            sims = torch.ones(len(trials))
            if reference is not None:
                sims = self.encoder(trials) @ reference
                ok = sims >= self.sentence_similarity
            flips = ok & (p.argmax(1) != label)
            if flips.any():
                best = int(torch.where(flips, sims, torch.full_like(sims, -2)).argmax())
                current[i] = subs[best]
                changed.add(i)
                return Outcome("success", " ".join(current), len(changed), len(words), queries)
            scores = torch.where(ok, p[:, label], torch.full_like(sims, 2))
            best = int(scores.argmin())
            if float(scores[best]) < p_label:
                current[i], p_label = subs[best], float(scores[best])
                changed.add(i)
        return Outcome("failure", "", len(changed), len(words), queries)


@dataclass(frozen=True)
class Report:
    """Robustness of a classifier on a set of sentences (percentages as in the KRP paper)."""

    clean_accuracy: float  # % correctly classified before the attack
    accuracy_under_attack: float  # % still correct after it (Aua)
    attack_success_rate: float  # % of the correctly classified that were flipped (Asr)
    words_perturbed: float  # mean % of words changed in the successful adversarial examples
    queries: float  # mean victim queries per attacked sentence
    examples: int


def evaluate(
    attack: WordSubstitution, predict: Predict, sentences: Sequence[str], labels: Sequence[int]
) -> tuple[Report, list[Outcome]]:
    """Attack every sentence; the summary and each outcome."""
    if len(sentences) != len(labels) or not sentences:
        raise ValueError(
            f"evaluate: needs as many labels as sentences (>= 1), got {len(sentences)} and "
            f"{len(labels)}"
        )
    outcomes = [attack.attack(predict, s, int(y)) for s, y in zip(sentences, labels, strict=True)]
    n = len(outcomes)
    correct = [o for o in outcomes if o.status != "skipped"]
    wins = [o for o in correct if o.status == "success"]
    report = Report(
        clean_accuracy=100 * len(correct) / n,
        accuracy_under_attack=100 * (len(correct) - len(wins)) / n,
        attack_success_rate=100 * len(wins) / len(correct) if correct else float("nan"),
        words_perturbed=(
            100 * sum(o.changed / o.words for o in wins) / len(wins) if wins else float("nan")
        ),
        queries=sum(o.queries for o in correct) / len(correct) if correct else float("nan"),
        examples=n,
    )
    return report, outcomes
