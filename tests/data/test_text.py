"""Text data sources: the bundled demo corpus, GLUE-style files in a data root, the hub option."""

import logging
import sys
import types

import numpy as np
import pytest
import torch

from fedleak import hf
from fedleak.data import DATASETS, text
from fedleak.registry import ConfigError

pytest.importorskip("transformers")

CLS, SEP, PAD = 101, 102, 0


def decode(ids):
    return hf.tokenizer().decode(ids, skip_special_tokens=True)


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- the demo corpus ---------------------------------------------------------------------------


def test_demo_text_needs_no_root_and_gives_padded_token_ids():
    data = DATASETS.build({"name": "demo_text"}).load()
    task = data.task
    assert task.modality == "text" and task.input_shape == (16,) and task.num_classes == 2
    assert task.tokenizer == hf.tokenizer_dir() and (hf.minilm_dir() / "vocab.txt").is_file()
    assert len(data.train) == 248 and len(data.test) == 62
    for split in (data.train, data.test):
        assert split.inputs.dtype == torch.long and split.inputs.shape[1] == 16
        assert (split.inputs[:, 0] == CLS).all()
        assert ((split.inputs == SEP).sum(1) == 1).all()  # every sentence fits: one [SEP] each
        lengths = (split.inputs != PAD).sum(1)
        after = torch.arange(16) >= lengths[:, None]
        assert (split.inputs[after] == PAD).all()  # padding only after the sentence
    labels = torch.cat([data.train.labels, data.test.labels])
    assert labels.bincount().tolist() == [155, 155]


def test_demo_text_split_is_fixed_and_sentences_read_back():
    a = DATASETS.build({"name": "demo_text"}).load()
    b = DATASETS.build({"name": "demo_text"}).load()
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.labels, b.test.labels)
    sentences = {decode(row) for row in torch.cat([a.train.inputs, a.test.inputs])}
    assert "i am very happy with this purchase." in sentences
    assert "the film was dull and far too long." in sentences
    assert len(sentences) == 310  # all distinct


def test_max_len_truncates_but_keeps_cls_and_sep(caplog):
    with caplog.at_level(logging.INFO):
        data = DATASETS.build({"name": "demo_text", "max_len": 5, "limit": 10}).load()
    assert data.train.inputs.shape == (10, 5)
    assert (data.train.inputs[:, 0] == CLS).all() and (data.train.inputs[:, -1] == SEP).all()
    assert "longer than max_len=5 tokens and were truncated" in caplog.text


def test_a_local_tokenizer_folder_can_be_named():
    folder = str(hf.minilm_dir())
    data = DATASETS.build({"name": "demo_text", "tokenizer": folder}).load()
    default = DATASETS.build({"name": "demo_text"}).load()
    assert data.task.tokenizer == folder
    assert torch.equal(data.train.inputs, default.train.inputs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "demo_text", "max_len": 2}, r"max_len must be in 3\.\.512"),
        ({"name": "demo_text", "test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
        ({"name": "demo_text", "tokenizer": "/nowhere"}, "not a local directory"),
        ({"name": "sst2"}, "set data.root to a folder with the SST-2 files"),
        ({"name": "cola", "limit": -1, "root": "x"}, "limit must be >= 0"),
    ],
)
def test_bad_options_fail_when_the_config_loads(spec, message):
    with pytest.raises(ConfigError, match=message):
        DATASETS.build(spec)


# --- file formats ------------------------------------------------------------------------------


def test_tsv_formats_glue_header_text_header_and_cola_raw(tmp_path):
    write(tmp_path / "a.tsv", ["sentence\tlabel", "a fine film \t1", "", "a bad film\t0"])
    write(tmp_path / "b.tsv", ["text\tlabel", "good\t1"])
    write(tmp_path / "c.tsv", ["gj04\t1\t\tThe sailors rode.", "gj04\t0\t*\tRode sailors the."])
    sentences, labels = text.read_tsv(tmp_path / "a.tsv")
    assert sentences == ["a fine film", "a bad film"] and labels.tolist() == [1, 0]
    assert text.read_tsv(tmp_path / "b.tsv")[0] == ["good"]
    sentences, labels = text.read_tsv(tmp_path / "c.tsv")
    assert sentences == ["The sailors rode.", "Rode sailors the."] and labels.tolist() == [1, 0]


def test_unreadable_rows_name_the_file_and_line(tmp_path):
    write(tmp_path / "bad.tsv", ["sentence\tlabel", "fine\t1", "broken row without label"])
    with pytest.raises(ValueError, match=r"bad\.tsv, line 3: cannot read"):
        text.read_tsv(tmp_path / "bad.tsv")
    write(tmp_path / "odd.tsv", ["a\tb\tc"])
    with pytest.raises(ValueError, match="CoLA's four header-less columns"):
        text.read_tsv(tmp_path / "odd.tsv")


def test_glue_layout_gives_both_splits(tmp_path):
    write(
        tmp_path / "SST-2" / "train.tsv", ["sentence\tlabel"] + [f"good {i}\t1" for i in range(6)]
    )
    write(tmp_path / "SST-2" / "dev.tsv", ["sentence\tlabel", "bad\t0", "fine\t1"])
    data = DATASETS.build({"name": "sst2", "root": str(tmp_path), "max_len": 8}).load()
    assert len(data.train) == 6 and len(data.test) == 2
    assert decode(data.test.inputs[0]) == "bad" and data.test.labels.tolist() == [0, 1]
    limited = DATASETS.build({"name": "sst2", "root": str(tmp_path), "limit": 4}).load()
    assert len(limited.train) == 4 and len(limited.test) == 2


def test_a_lone_split_is_divided_and_the_log_says_so(tmp_path, caplog):
    write(
        tmp_path / "rotten_tomatoes_test_x.tsv",
        ["text\tlabel"] + [f"s{i}\t{i % 2}" for i in range(20)],
    )
    with caplog.at_level(logging.INFO):
        data = DATASETS.build({"name": "rotten_tomatoes", "root": str(tmp_path)}).load()
    assert "found only the test split (20 sentences)" in caplog.text
    assert len(data.train) == 16 and len(data.test) == 4


def test_missing_files_list_every_place_looked(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"(?s)found no CoLA files.*CoLA/train\.tsv.*download"
    ):
        DATASETS.build({"name": "cola", "root": str(tmp_path)}).load()


def test_ambiguous_files_are_refused(tmp_path):
    for name in ("sst2_dev_a.tsv", "sst2_dev_b.tsv"):
        write(tmp_path / name, ["sentence\tlabel", "x\t1"])
    with pytest.raises(ValueError, match=r"several files match 'sst2_dev\*\.tsv'.*keep one"):
        DATASETS.build({"name": "sst2", "root": str(tmp_path)}).load()


def test_labels_outside_the_classes_are_refused(tmp_path):
    write(tmp_path / "SST-2" / "dev.tsv", ["sentence\tlabel"] + [f"s{i}\t{i}" for i in range(10)])
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.1, found \[2, 3"):
        DATASETS.build({"name": "sst2", "root": str(tmp_path)}).load()


# --- the hub option ----------------------------------------------------------------------------


def fake_datasets(calls):
    def load_dataset(*args, cache_dir=None):
        calls.append((args, cache_dir))
        rows = {"text": ["a good one", "a bad one"], "label": [1, 0]}
        return {"train": rows, "test": {"text": ["meh"], "label": [0]}}

    return types.SimpleNamespace(load_dataset=load_dataset)


def test_download_loads_the_hub_splits_when_the_root_has_none(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(calls))
    spec = {"name": "rotten_tomatoes", "root": str(tmp_path), "download": True}
    data = DATASETS.build(spec).load()
    assert calls == [(("rotten_tomatoes",), str(tmp_path))]
    assert len(data.train) == 2 and len(data.test) == 1
    assert decode(data.train.inputs[0]) == "a good one"
    assert DATASETS.build({"name": "rotten_tomatoes", "download": True}).load()  # no root: ok


def test_download_without_the_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="download = true needs the package 'datasets'"):
        DATASETS.build({"name": "sst2", "download": True}).load()


# --- the shared data root ----------------------------------------------------------------------


def test_shared_sst2_cola_and_rotten_tomatoes(data_root):
    sst2 = DATASETS.build({"name": "sst2", "root": str(data_root)}).load()
    assert len(sst2.train) == 2000 and len(sst2.test) == 436
    assert decode(sst2.train.inputs[0]) == "hide new secretions from the parental units"
    sentences, labels = text.read_tsv(data_root / "cola_in_domain_dev.tsv")
    assert (
        len(sentences) == 527 and sentences[0] == "The sailors rode the breeze clear of the rocks."
    )
    cola = DATASETS.build({"name": "cola", "root": str(data_root)}).load()
    assert len(cola.train) + len(cola.test) == 527
    rt = DATASETS.build({"name": "rotten_tomatoes", "root": str(data_root), "max_len": 64}).load()
    labels = torch.cat([rt.train.labels, rt.test.labels])
    assert labels.bincount().tolist() == [266, 266]
    assert np.isin(rt.train.inputs[:, 0].numpy(), [CLS]).all()
