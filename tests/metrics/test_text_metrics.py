"""Text metrics: decoding, matching, ROUGE (clean and LAMP-compatible), token and label scores."""

import math

import pytest
import torch

from fedleak import hf, metrics
from fedleak.core import Batch, Reconstruction, Task
from fedleak.metrics import text

pytest.importorskip("rouge_score")
pytest.importorskip("transformers")

LENGTH = 12


def task():
    return Task("text", (LENGTH,), 2, tokenizer=hf.tokenizer_dir())


def encode(*sentences, length=LENGTH):
    out = hf.tokenizer()(list(sentences), padding="max_length", max_length=length, truncation=True)
    return torch.tensor(out["input_ids"])


def batch(*sentences, labels=None):
    return Batch(encode(*sentences), torch.tensor(labels or [0] * len(sentences)))


TRUE = ("the cat sat on the mat", "a dog barked at night", "rain fell all day")


def test_a_perfect_reconstruction_in_any_order_scores_one():
    truth = batch(*TRUE, labels=[0, 1, 1])
    shuffled = Reconstruction(truth.inputs[[2, 0, 1]], labels=torch.tensor([1, 0, 1]))
    scores = text.score(shuffled, truth, task())
    for key in ("rouge1", "rouge2", "rougeL", "rouge1_lamp", "token_acc", "exact"):
        assert scores[key] == pytest.approx(1.0), key
    assert scores["token_overlap"] == 1.0
    assert scores["label_acc"] == 1.0 and scores["label_acc_matched"] == 1.0


def test_rouge_values_by_hand():
    truth = batch("the cat sat on the mat")
    scores = text.score(Reconstruction(encode("the cat sat")), truth, task())
    # ROUGE-1: 3 of 3 recovered words are right, 3 of the truth's 6: P = 1, R = 1/2, F = 2/3
    assert scores["rouge1"] == pytest.approx(2 / 3)
    # ROUGE-2: bigrams "the cat", "cat sat" of 2 recovered, 5 true: F = 2·1·0.4 / 1.4
    assert scores["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    # with [CLS] and [SEP] kept: 5 of 5 recovered words match, 5 of 8 true: F = 2·5/8 / (1+5/8)
    assert scores["rouge1_lamp"] == pytest.approx(2 * (5 / 8) / (1 + 5 / 8))
    assert scores["token_acc"] == pytest.approx(3 / 6)  # positions 1-3 of the 6 words
    assert scores["exact"] == 0.0 and math.isnan(scores["label_acc"])


def test_special_tokens_inflate_only_the_lamp_compatible_scores():
    truth = batch("alpha beta gamma delta")
    scores = text.score(Reconstruction(encode("one two three four")), truth, task())
    assert scores["rouge1"] == 0.0 and scores["rouge2"] == 0.0 and scores["token_acc"] == 0.0
    # "cls" and "sep" always match: 2 of 6 words on each side (notes §1.7: 2/(n+2))
    assert scores["rouge1_lamp"] == pytest.approx(2 / 6)
    assert scores["rouge2_lamp"] == 0.0


def test_lamp_decoding_cuts_after_the_last_sep_like_lamp():
    ids = encode("good film")  # [CLS] good film [SEP] [PAD] ...
    assert text.decode(ids, task(), lamp=True) == ["[CLS] good film [SEP]"]
    assert text.decode(ids, task()) == ["good film"]
    no_sep = ids.clone()
    no_sep[no_sep == 102] = 0  # without [SEP], LAMP keeps the padding: "pad" words count
    assert text.decode(no_sep, task(), lamp=True)[0].count("[PAD]") == LENGTH - 3


def test_word_order_matters_for_token_accuracy_not_for_the_bag():
    truth = batch("the cat sat on the mat")
    shifted = Reconstruction(encode("mat the cat sat on the"))
    scores = text.score(shifted, truth, task())
    assert scores["rouge1"] == pytest.approx(1.0) and scores["token_overlap"] == 1.0
    assert scores["token_acc"] == 0.0 and scores["rouge2"] < 1.0


def test_matching_pairs_each_truth_with_its_closest_reconstruction():
    truth = batch(*TRUE, labels=[0, 1, 0])
    rec = encode("rain fell all week", "the cat sat on a mat")  # fewer than the truths
    scores = text.score(Reconstruction(rec, labels=torch.tensor([0, 0])), truth, task())
    rec_idx, true_idx = text.match(text.decode(rec, task()), text.decode(truth.inputs, task()))
    assert true_idx.tolist() == [0, 2] and rec_idx.tolist() == [1, 0]
    assert 0.5 < scores["rouge1"] < 1.0
    assert scores["label_acc_matched"] == 1.0  # labels of truths 0 and 2 are both 0
    assert scores["label_acc"] == pytest.approx(2 / 3)  # multisets {0, 0} vs {0, 1, 0}


def test_metrics_score_dispatches_text_and_has_the_headline_keys():
    truth = batch(*TRUE)
    scores = metrics.score(Reconstruction(truth.inputs), truth, task())
    assert set(metrics.HEADLINE["text"]) <= set(scores)


def test_bad_inputs_are_refused():
    truth = batch(*TRUE)
    with pytest.raises(ValueError, match=r"token ids \[B, T\]"):
        text.score(Reconstruction(torch.zeros(3, 1, 8, 8)), truth, task())
    with pytest.raises(ValueError, match="at least one reconstruction"):
        text.score(Reconstruction(torch.zeros(0, LENGTH).long()), truth, task())


def test_save_text_writes_truth_and_matched_reconstruction(tmp_path):
    truth = batch(*TRUE)
    rec = encode("rain fell all week", "the cat sat on a mat", "zebra", "yak")
    text.save_text(tmp_path / "r.txt", truth, Reconstruction(rec), task())
    lines = (tmp_path / "r.txt").read_text().splitlines()
    assert lines[:2] == ["true 0: the cat sat on the mat", "rec  0: the cat sat on a mat"]
    assert lines[6:8] == ["true 2: rain fell all day", "rec  2: rain fell all week"]
    assert sum(line.startswith("rec  -:") for line in lines) == 1  # 4 recovered, 3 true
