"""Prune a causal LM standalone from a TOML file: what ``fedleak prune CONFIG`` runs.

The file names the model (``"smollm2"``: the offline SmolLM2-135M, or a local Hugging Face
causal-LM folder), the WikiText-2 file, the calibration and evaluation sizes and a
``[pruner]`` table (any :data:`fedleak.pruning.PRUNERS` entry and its options).  The result is
the dense and pruned perplexity, the nonzero parameters, the forward FLOPs per token and the
pruning wall time.  From Python, in a few lines::

    model, tokenizer = smollm2.load()
    PRUNERS["goa"](ratio=0.2, mode="physical").prune(model, calibration_ids, torch.Generator())
"""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from fedleak import hf
from fedleak.pruning import PRUNERS, lm_eval, smollm2
from fedleak.pruning.structured import flops_per_token, parameter_count
from fedleak.registry import ConfigError

DEFAULTS = {
    "model": "smollm2",
    "wikitext": "",  # "" = wiki.test.raw in $FEDLEAK_DATA_ROOT (else ../shared/data)
    "seed": 0,
    "calibration": 32,
    "length": 128,
    "eval_windows": 16,
    "dense": True,  # also score the model before pruning
}


def load(path: str | Path) -> dict[str, Any]:
    """The file's settings over the defaults, checked before any model is loaded."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (e.g. simulations/pruning/smollm2.toml)")
    with open(file, "rb") as f:
        cfg = {**DEFAULTS, **tomllib.load(f)}
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"pruner", "name", "description"})
    if unknown:
        raise ConfigError(f"{file}: unknown setting {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    if "pruner" not in cfg:
        raise ConfigError(f'{file}: needs a [pruner] table, e.g. name = "goa", ratio = 0.2')
    for key in ("calibration", "length", "eval_windows"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{file}: {key} must be a positive integer, got {cfg[key]!r}")
    if cfg["model"] != "smollm2":
        hf.check_dir(cfg["model"], ("config.json",), "model")
    cfg["pruner_object"] = PRUNERS.build(cfg["pruner"], "pruner")
    return cfg


def run(cfg: dict[str, Any]) -> dict[str, float]:
    """Load, (score,) prune, score; the numbers ``fedleak prune`` prints."""
    if cfg["model"] == "smollm2":
        model, tokenizer = smollm2.load(attention="eager")
    else:
        transformers = hf.require("transformers", "fedleak prune")
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg["model"], local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            cfg["model"], attn_implementation="eager", local_files_only=True
        ).eval()
    root = os.environ.get("FEDLEAK_DATA_ROOT", str(Path(__file__).parents[3] / "shared" / "data"))
    text = cfg["wikitext"] or str(Path(root) / "wiki.test.raw")
    ids = lm_eval.wikitext_ids(text, tokenizer)
    rng = torch.Generator().manual_seed(cfg["seed"])
    calibration = lm_eval.calibration_windows(ids, cfg["calibration"], cfg["length"], rng)
    windows = lm_eval.evaluation_windows(ids, cfg["eval_windows"], cfg["length"])
    out: dict[str, float] = {
        "dense_parameters": parameter_count(model),
        "dense_gflops_per_token": flops_per_token(model, cfg["length"]) / 1e9,
    }
    if cfg["dense"]:
        out["dense_perplexity"] = lm_eval.perplexity(model, windows)
    start = time.perf_counter()
    cfg["pruner_object"].prune(model, calibration, torch.Generator().manual_seed(cfg["seed"]))
    out["prune_seconds"] = time.perf_counter() - start
    out["perplexity"] = lm_eval.perplexity(model, windows)
    out["parameters"] = parameter_count(model)
    out["gflops_per_token"] = flops_per_token(model, cfg["length"]) / 1e9
    return out
