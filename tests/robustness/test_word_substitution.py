"""The offline TextFooler-style attack: caps, real flips, the report, the MiniLM resources."""

from __future__ import annotations

import pytest
import torch

from fedleak.robustness import word_substitution as ws

POSITIVE = {"good": 1.0, "great": 1.5, "fine": 0.6, "lovely": 1.2}
NEGATIVE = {"bad": -1.0, "awful": -1.5, "poor": -0.8}
WORDS = [*POSITIVE, *NEGATIVE, "film", "movie", "story", "plot", "cast"]


def _embeddings() -> torch.Tensor:
    """Sentiment words near each other (as in MiniLM, antonyms included), nouns elsewhere."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for w in WORDS:
        base = torch.tensor([1.0, 0.0, 0.0]) if w in POSITIVE or w in NEGATIVE else torch.zeros(3)
        if w not in POSITIVE and w not in NEGATIVE:
            base = torch.tensor([0.0, 1.0, 0.0])
        rows.append(torch.cat([base, 0.3 * torch.randn(5, generator=g)]))
    return torch.stack(rows)


def predict(sentences: list[str]) -> torch.Tensor:
    """A bag-of-words sentiment model: p(positive) = sigmoid(sum of word weights + 0.2)."""
    scores = []
    for s in sentences:
        total = 0.2 + sum(POSITIVE.get(w, 0.0) + NEGATIVE.get(w, 0.0) for w in s.split())
        scores.append(total)
    p = torch.sigmoid(torch.tensor(scores))
    return torch.stack([1 - p, p], 1)


SENTENCES = [
    "a good film with a great cast and a lovely story",
    "the plot was good",
    "good good great film",
    "an awful movie with a poor plot",
    "bad film",
    "the cast was fine",
]


def _attack(**options) -> ws.WordSubstitution:
    neighbours = ws.Neighbours(WORDS, _embeddings())
    return ws.WordSubstitution(neighbours=neighbours, sentence_similarity=0.0, **options)


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_never_more_words_than_the_cap_and_only_real_flips(cap):
    attack = _attack(max_changed=cap, max_fraction=1.0, word_similarity=0.0)
    labels = [int(predict([s])[0].argmax()) for s in SENTENCES]
    report, outcomes = ws.evaluate(attack, predict, SENTENCES, labels)
    assert any(o.status == "success" for o in outcomes)
    for sentence, label, outcome in zip(SENTENCES, labels, outcomes, strict=True):
        if outcome.status != "success":
            assert outcome.adversarial == ""
            continue
        original, adversarial = sentence.split(), outcome.adversarial.split()
        changed = sum(a != b for a, b in zip(original, adversarial, strict=True))
        assert changed == outcome.changed <= cap
        assert int(predict([outcome.adversarial])[0].argmax()) != label  # a real flip
    assert report.clean_accuracy == 100
    successes = sum(o.status == "success" for o in outcomes)
    assert report.attack_success_rate == pytest.approx(100 * successes / len(SENTENCES))
    assert report.accuracy_under_attack == pytest.approx(100 - report.attack_success_rate)


def test_a_tighter_cap_flips_fewer_sentences():
    labels = [int(predict([s])[0].argmax()) for s in SENTENCES]
    rates = [
        ws.evaluate(
            _attack(max_changed=c, max_fraction=1.0, word_similarity=0.0),
            predict,
            SENTENCES,
            labels,
        )[0].attack_success_rate
        for c in (1, 3)
    ]
    assert rates[0] < rates[1]


def test_misclassified_sentences_are_skipped_and_stop_words_never_changed():
    attack = _attack(max_changed=5, max_fraction=1.0, word_similarity=0.0)
    outcome = attack.attack(predict, "good film", 0)  # the model says positive: skipped
    assert outcome.status == "skipped" and outcome.queries == 1
    report, outcomes = ws.evaluate(attack, predict, SENTENCES, [1] * len(SENTENCES))
    assert report.clean_accuracy == pytest.approx(100 * 4 / 6)
    for sentence, outcome in zip(SENTENCES, outcomes, strict=True):
        for a, b in zip(sentence.split(), outcome.adversarial.split(), strict=False):
            assert a == b or a not in ws.STOP_WORDS


def test_the_coarse_part_of_speech_filter():
    assert ws.coarse_pos("beautifully") == "adv" and ws.coarse_pos("boring") == "verb"
    assert ws.coarse_pos("film") == ""
    assert not ws.same_pos("beautifully", "beautiful")  # adverb for adjective
    assert not ws.same_pos("quickly", "running")
    assert ws.same_pos("film", "running")  # an untagged word says nothing


def test_minilm_neighbours_are_whole_words_above_the_threshold():
    neighbours = ws.Neighbours.minilm()
    found = neighbours.of("terrible", 10, 0.5)
    words = [w for w, _ in found]
    assert "horrible" in words and "terrible" not in words
    assert all(w.isalpha() and s >= 0.5 for w, s in found)
    assert neighbours.of("##ing", 10, 0.0) == []  # word pieces are never substitutes


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_changed": 0}, "max_changed must be >= 1"),
        ({"max_fraction": 0.0}, r"max_fraction must be in \(0, 1\]"),
        ({"candidates": 0}, "candidates must be >= 1"),
        ({"word_similarity": 2.0}, "word_similarity must be a cosine"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        ws.WordSubstitution(**options)


@pytest.mark.slow  # loads the MiniLM sentence encoder; ~50 s on a loaded 2-core machine
def test_on_a_real_classifier_with_the_minilm_resources(text):
    """Tiny BERT victim, MiniLM substitutes and sentence encoder: the invariants still hold."""
    model = text.model()
    predict = ws.classifier_predict(model, 12)
    labels = predict(list(text.SENTENCES)).argmax(1).tolist()  # all correct: every one attacked
    attack = ws.WordSubstitution(max_changed=2, word_similarity=0.3, sentence_similarity=0.5)
    report, outcomes = ws.evaluate(attack, predict, list(text.SENTENCES), labels)
    assert report.clean_accuracy == 100
    for sentence, label, outcome in zip(text.SENTENCES, labels, outcomes, strict=True):
        assert outcome.status in ("success", "failure") and outcome.queries > len(sentence.split())
        if outcome.status == "success":
            changed = sum(
                a != b for a, b in zip(sentence.split(), outcome.adversarial.split(), strict=True)
            )
            assert changed <= 2
            assert int(predict([outcome.adversarial])[0].argmax()) != label
