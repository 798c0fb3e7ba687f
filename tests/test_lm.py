"""Language priors: a normalised Kneser–Ney n-gram over word-pieces, cached; the empty prior."""

import logging

import pytest
import torch

from fedleak import lm
from fedleak.registry import ConfigError

pytest.importorskip("transformers")

CORPUS = """The film was a joy from start to finish.
The film was dull and far too long.
He was born in the city of London.
She was born in the city of Paris, and she stayed there.
"""


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS * 3)
    return path


def _ids(sentences):
    from fedleak import hf

    encoded = hf.tokenizer()(sentences, padding=True, return_tensors="pt")["input_ids"]
    return encoded, (encoded != 0).sum(1)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_probabilities_of_the_next_token_sum_to_one(corpus, tmp_path, order):
    model = lm.NGram(order=order, corpus=str(corpus), cache=str(tmp_path)).load()
    ids, _ = _ids(["he was born in the"])
    context = ids[:, :-1]  # [CLS] he was born in the (no [SEP])
    vocab = model.vocab
    rows = torch.cat([context.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
    full = model.nll(rows, torch.full((vocab,), rows.shape[1]))
    base = model.nll(context, torch.full((1,), context.shape[1]))
    probabilities = torch.exp(base - full)
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-9)
    from fedleak import hf

    assert hf.tokenizer().convert_ids_to_tokens(int(probabilities.argmax())) == "city"


def test_natural_order_is_likelier_than_a_shuffle(corpus, tmp_path):
    model = lm.NGram(corpus=str(corpus), cache=str(tmp_path)).load()
    ids, lengths = _ids(
        ["the film was dull and far too long .", "long film the too far was dull ."]
    )
    nll = model.nll(ids, lengths)
    assert nll.shape == (2,) and torch.isfinite(nll).all()
    assert nll[0] < nll[1]
    # positions past a row's length do not count
    padded = torch.cat([ids, torch.full((2, 3), 2000)], dim=1)
    assert torch.allclose(model.nll(padded, lengths), nll)


def test_the_model_is_cached_on_disk_and_reused(corpus, tmp_path):
    cache = tmp_path / "cache"
    first = lm.NGram(corpus=str(corpus), cache=str(cache)).load()
    files = list(cache.glob("ngram-3-*.npz"))
    assert len(files) == 1
    lm._load.cache_clear()  # a new process: read from the cache file
    again = lm.NGram(corpus=str(corpus), cache=str(cache)).load()
    ids, lengths = _ids(["she was born in the city of paris ."])
    assert torch.equal(first.nll(ids, lengths), again.nll(ids, lengths))
    assert list(cache.glob("ngram-3-*.npz")) == files


def test_without_a_corpus_there_is_no_prior_and_a_warning(monkeypatch, caplog):
    monkeypatch.delenv(lm.DATA_ROOT_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="fedleak.lm"):
        scorer = lm.NGram().load()
    assert isinstance(scorer, lm.NoPrior) and "without a language prior" in caplog.text
    ids, lengths = _ids(["a b c"])
    assert scorer.nll(ids, lengths).tolist() == [0.0]


def test_wikitext_is_found_in_the_data_root(monkeypatch, tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" = Heading = \n The film was fine . It was long .\n")
    monkeypatch.setenv(lm.DATA_ROOT_ENV, str(tmp_path))
    assert lm.corpus_files("") == [tmp_path / "wiki.test.raw"]
    assert lm.read_corpus(lm.corpus_files("")) == ["The film was fine .", "It was long ."]


def test_tsv_corpora_use_their_sentence_column(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\nfirst one .\t1\nsecond one .\t0\n")
    assert lm.read_corpus([path]) == ["first one .", "second one ."]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"order": 5}, "order must be 2, 3 or 4"),
        ({"discount": 1.0}, r"discount must be in \(0, 1\)"),
        ({"corpus": "/no/such/file.txt"}, "does not exist"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        lm.PRIORS.build({"name": "ngram", **options})
