"""Text gradient-inversion attacks on MiniLM: TAG, LAMP and the pooler attack, at equal budgets.

For each data set (CoLA, SST-2, Rotten Tomatoes from the data root), batch size B and attack,
``batches`` batches of B sentences are each sent through one FedSGD step of the pretrained
MiniLM (``ServerView.from_local_step``; the pooler attacks first get the server's pooler
modifier, with fresh Gaussian rows per batch), attacked, and scored after Hungarian matching:
ROUGE-1/2/L F both LAMP-compatible (special tokens kept, as the papers computed them) and clean,
token accuracy, the recovered pooler-feature cosine (pooler attacks), and seconds.  Sentences:
LAMP's protocol by default (the file shuffled with seed 101, the first ``batches × B``), every
attack with the same number of continuous steps, labels and lengths known as in both papers
(``--unknown`` recovers them from the update instead).  The published BERT-base numbers of the
pooler paper's results file (notes, text-attacks.md §1.8) are printed beside ours for
reference: they are for a larger model at 2,000 steps and are not comparable one to one.

Outputs, written as rows finish (a rerun skips finished (dataset, B, batch, attack) rows, so an
interrupted run resumes):

* ``text_attacks_runs.csv``  one row per attacked batch;
* ``text_attacks.csv``       one row per (dataset, attack, B): the means;
* ``text_attacks.md``        that table with the published numbers, the machine and settings.

``--timing`` instead measures the cost of one continuous step, one initial candidate and one
discrete step on MiniLM at each B, and estimates the full benchmark's time at 50/100/200 steps
(``text_attacks_timing.md``).

    .venv/bin/python simulations/benchmarks/text_attacks.py            # the full benchmark
    .venv/bin/python simulations/benchmarks/text_attacks.py --quick    # tiny BERT, for CI
    .venv/bin/python simulations/benchmarks/text_attacks.py --timing   # cost and estimates
    .venv/bin/python simulations/benchmarks/text_attacks.py --datasets cola --batch-sizes 2 \\
        --batches 2 --out /tmp/ta --data-root DIR

Settings come from ``text_attacks.toml`` (``--config``; a file may name a ``base`` it extends
and the ``rows`` to run, as ``text_ablation.toml`` does); options given here override it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from importlib import resources
from pathlib import Path

import _bench  # first: keeps Flower offline
import numpy as np
import pandas as pd
import torch
from torch import nn

from fedleak import hf, metrics, results, seeding
from fedleak.attacks import ATTACKS
from fedleak.core import Batch, Reconstruction, ServerView, Task
from fedleak.data import text as text_data
from fedleak.models import MODELS
from fedleak.modifiers import MODIFIERS

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "text_attacks.toml"
RUNS = "text_attacks_runs.csv"
SUMMARY = "text_attacks.csv"
PAGE = "text_attacks.md"
TIMING = "text_attacks_timing.md"
SCORES = [
    "rouge1_lamp",
    "rouge2_lamp",
    "rougeL_lamp",
    "rouge1",
    "rouge2",
    "rougeL",
    "token_acc",
    "label_acc",
    "feature_cos",
]
RUN_FIELDS = [
    "dataset",
    "B",
    "batch",
    "attack",
    "steps",
    "sentences",
    *SCORES,
    "stage1_confidence",
    "seconds",
    *_bench.STAMP,
]
SUMMARY_FIELDS = ["dataset", "attack", "B", "batches", *SCORES, "seconds"]
# The pooler paper's results file (BERT-base; notes §1.8): R-1 / R-2 / R-L at B = 1, 2, 4.
# "Pooler-honest" is set beside "Ours-tanh", the closest published row (a tanh pooler).
PUBLISHED = {
    "sst2": {
        "TAG": ((71.8, 46.1, 44.5), (16.1, 10.9, 9.1), (54.4, 41.6, 40.1)),
        "LAMP": ((87.7, 59.6, 48.9), (54.1, 26.5, 17.1), (76.4, 53.8, 45.4)),
        "Pooler-honest": ((88.2, 66.4, 49.9), (56.9, 33.2, 15.6), (76.8, 61.2, 46.1)),
        "Pooler-SELU": ((90.3, 71.0, 58.6), (59.0, 35.3, 26.3), (78.2, 63.4, 54.2)),
        "Pooler-x3x2": ((93.1, 78.3, 60.6), (61.6, 40.9, 23.1), (81.5, 67.9, 54.9)),
    },
    "rotten_tomatoes": {
        "TAG": ((31.7, 26.9, 27.9), (2.5, 1.0, 0.9), (20.1, 19.1, 20.2)),
        "LAMP": ((63.4, 38.4, 24.6), (13.8, 6.4, 2.3), (42.6, 28.8, 20.0)),
        "Pooler-honest": ((64.2, 38.8, 28.3), (15.5, 5.8, 2.4), (43.8, 28.9, 21.2)),
        "Pooler-SELU": ((71.9, 48.1, 33.0), (19.2, 8.2, 4.2), (48.7, 34.2, 25.3)),
        "Pooler-x3x2": ((72.2, 44.6, 29.9), (21.0, 7.0, 3.5), (49.3, 31.8, 24.3)),
    },
    "cola": {
        "TAG": ((78.9, 45.6, 35.3), (10.2, 4.6, 1.6), (53.3, 36.9, 31.3)),
        "LAMP": ((84.8, 57.2, 40.4), (46.2, 21.9, 6.4), (73.1, 49.8, 36.2)),
        "Pooler-honest": ((84.5, 56.9, 41.2), (46.1, 22.0, 7.8), (72.8, 49.6, 40.1)),
        "Pooler-SELU": ((86.6, 69.5, 50.5), (51.5, 31.2, 11.8), (76.7, 60.6, 43.9)),
        "Pooler-x3x2": ((84.6, 57.3, 43.9), (45.2, 19.2, 11.4), (72.4, 49.8, 40.1)),
    },
}
PUBLISHED_B = (1, 2, 4)


# -- settings -------------------------------------------------------------------------------
def settings(args: argparse.Namespace) -> dict:
    """The TOML file, then --quick, then explicit options: the resolved settings."""
    cfg = _bench.load_config(args.config)
    quick = cfg.pop("quick", {})
    cfg.setdefault("attack_options", {})
    cfg.setdefault("modifier_options", {})
    if args.quick:
        keep = quick.pop("datasets", None)
        cfg.update(quick)
        if keep:
            cfg["datasets"] = {k: v for k, v in cfg["datasets"].items() if k in keep}
    for key in ("batch_sizes", "batches", "steps", "select", "select_seed", "seed", "max_len"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.unknown:
        cfg["known"] = False
    if args.datasets:
        unknown = [d for d in args.datasets if d not in cfg["datasets"]]
        if unknown:
            raise SystemExit(
                f"text_attacks: --datasets {unknown} not in {args.config}; it defines "
                f"{', '.join(cfg['datasets'])}"
            )
        cfg["datasets"] = {k: v for k, v in cfg["datasets"].items() if k in args.datasets}
    for item in args.file or ():
        name, sep, path = item.partition("=")
        if not sep or name not in cfg["datasets"]:
            raise SystemExit(
                f"text_attacks: --file wants DATASET=PATH with a known dataset, got {item!r}"
            )
        cfg["datasets"][name] = {"file": path}
    labels = [a["label"] for a in cfg["attacks"]]
    rows = args.attacks or cfg.pop("rows", None)  # the [[attacks]] to run (default: all)
    if rows:
        unknown = [a for a in rows if a not in labels]
        if unknown:
            raise SystemExit(
                f"text_attacks: attack rows {unknown} not in {args.config}; it defines "
                f"{', '.join(labels)}"
            )
        cfg["attacks"] = [a for a in cfg["attacks"] if a["label"] in rows]
    root = args.data_root or cfg["data_root"] or os.environ.get("FEDLEAK_DATA_ROOT", "")
    root = Path(root).expanduser() if root else _bench.REPO.parent / "shared" / "data"
    cfg["data_root"] = str(root if root.is_absolute() else (_bench.REPO / root).resolve())
    if cfg["batches"] < 1 or cfg["steps"] < 1 or not cfg["batch_sizes"]:
        raise SystemExit("text_attacks: need batches >= 1, steps >= 1 and some batch sizes")
    if cfg["select"] not in ("shuffle", "first"):
        raise SystemExit(f"text_attacks: select must be shuffle or first, got {cfg['select']!r}")
    return cfg


# -- data, models and views -----------------------------------------------------------------
def load_sentences(cfg: dict, name: str, quick: bool) -> tuple[list[str], np.ndarray, str]:
    """The selected sentences of one data set (the demo corpus when --quick has no data)."""
    path = Path(cfg["datasets"][name]["file"]).expanduser()
    if not path.is_absolute():
        path = Path(cfg["data_root"]) / path
    if not path.is_file():
        if not quick:
            raise SystemExit(
                f"text_attacks: no file {path}; point --data-root at the folder that holds it "
                f"or give --file {name}=PATH"
            )
        demo = resources.files("fedleak.data").joinpath(text_data.DEMO_FILE)
        sentences, labels = text_data.parse(demo.read_text("utf-8"), text_data.DEMO_FILE)
        where = f"the bundled demo corpus (no {path})"
    else:
        sentences, labels = text_data.read_tsv(path)
        where = str(path)
    need = cfg["batches"] * max(cfg["batch_sizes"])
    if len(sentences) < need:
        raise SystemExit(f"text_attacks: {where} has {len(sentences)} sentences, need {need}")
    order = np.arange(len(sentences))
    if cfg["select"] == "shuffle":
        order = np.random.default_rng(cfg["select_seed"]).permutation(len(sentences))
    return [sentences[i] for i in order], labels[order], where


def task_of(cfg: dict) -> Task:
    return Task("text", (cfg["max_len"],), 2, tokenizer=hf.tokenizer_dir())


def encode(sentences: list[str], labels: np.ndarray, task: Task) -> Batch:
    tok = hf.tokenizer(task.tokenizer)
    ids = tok(
        sentences,
        padding="max_length",
        truncation=True,
        max_length=task.input_shape[0],
        return_tensors="pt",
    )["input_ids"]
    return Batch(ids.long(), torch.as_tensor(labels, dtype=torch.long))


def base_model(cfg: dict, task: Task) -> nn.Module:
    with seeding.isolated(cfg["seed"], "model"):
        return MODELS.build(dict(cfg["model"]))(task)


def server_view(
    base: nn.Module, spec: dict, cfg: dict, batch: Batch, task: Task, rng: torch.Generator
) -> ServerView:
    """The view of one FedSGD step on ``batch``, after the attack's modifier (if any)."""
    model, secrets = copy.deepcopy(base), {}
    if "modifier" in spec:
        options = dict(spec["modifier"])
        if options.get("hd", 1):  # --quick shrinks planted poolers, never the honest one
            options.update(cfg["modifier_options"])
        model, secrets = MODIFIERS.build(options).install(model, rng)
    view = ServerView.from_local_step(model.train(), batch, task)
    return dataclasses.replace(view, secrets=secrets)


def attack_of(spec: dict, cfg: dict, batch: Batch, task: Task):
    name = spec["attack"]["name"]
    options = {**spec["attack"], **cfg["attack_options"].get(name, {}), "steps": cfg["steps"]}
    corpus = Path(cfg["data_root"]) / cfg["prior_corpus"]
    if name != "tag":
        options.setdefault("corpus", str(corpus) if corpus.is_file() else "demo")
    if cfg["known"]:
        pad = hf.tokenizer(task.tokenizer).pad_token_id
        options["known_labels"] = batch.labels.tolist()
        options["known_lengths"] = (batch.inputs != pad).sum(1).tolist()
    return ATTACKS.build(options)


# -- running --------------------------------------------------------------------------------
def cells(cfg: dict) -> Iterable[tuple[str, int, int, str]]:
    for name in cfg["datasets"]:
        for size in cfg["batch_sizes"]:
            for k in range(cfg["batches"]):
                for spec in cfg["attacks"]:
                    yield name, size, k, spec["label"]


def run_one(
    cfg: dict, data: dict, name: str, size: int, k: int, label: str, device: torch.device | str
) -> dict:
    spec = next(a for a in cfg["attacks"] if a["label"] == label)
    sentences, labels, _ = data[name]
    task = data["task"]
    picked = list(range(k * size, (k + 1) * size))
    batch = encode([sentences[i] for i in picked], labels[picked], task)
    seed = cfg["seed"]
    view = server_view(
        data["model"], spec, cfg, batch, task, seeding.rng(seed, "modifier", name, size, k)
    )
    attack = attack_of(spec, cfg, batch, task)
    # Only an oracle row (the official code's truth-based pairing, for parity) sees the truth.
    truth = {"truth": batch.to(device)} if spec["attack"].get("oracle") else {}
    start = time.perf_counter()
    rng = seeding.rng(seed, "attack", label, name, size, k)
    # On the device, scored on the CPU.
    reconstruction = attack(view.to(device), rng, **truth).to("cpu")
    seconds = time.perf_counter() - start
    scores = metrics.score(reconstruction, batch, task, view=view)
    return {
        "dataset": name,
        "B": size,
        "batch": k,
        "attack": label,
        "steps": cfg["steps"],
        "sentences": " ".join(str(i) for i in picked),
        **{f: scores.get(f, math.nan) for f in SCORES},
        "stage1_confidence": reconstruction.info.get("stage1_confidence", math.nan),
        "seconds": seconds,
    }


# -- tables ---------------------------------------------------------------------------------
def summarise(rows: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    """One row per (dataset, attack, B) with rows, in the settings' order; means skip NaN."""
    grouped = rows.groupby(["dataset", "attack", "B"])
    cells = grouped[[*SCORES, "seconds"]].agg(results.mean).assign(batches=grouped.size())
    order = [
        (name, spec["label"], size)
        for name in cfg["datasets"]
        for spec in cfg["attacks"]
        for size in cfg["batch_sizes"]
    ]
    return cells.loc[[k for k in order if k in cells.index]].reset_index()


def write_tables(out: Path, cfg: dict, rows: pd.DataFrame, facts: dict) -> str:
    summary = summarise(rows, cfg)
    page = markdown(cfg, summary, rows, {**facts, "provenance": _bench.provenance(rows)})
    return _bench.write_summary(out / SUMMARY, summary, SUMMARY_FIELDS, out / PAGE, page)


def markdown(cfg: dict, summary: pd.DataFrame, rows: pd.DataFrame, facts: dict) -> str:
    attacks = "; ".join(
        f"{a['label']} = `{a['attack']}`"
        + (f" + modifier `{a['modifier']}`" if "modifier" in a else "")
        for a in cfg["attacks"]
    )
    known = (
        "known (as in LAMP and the pooler paper)" if cfg["known"] else "recovered from the update"
    )
    lines = [
        "# Text attacks on MiniLM",
        "",
        f"Machine: {os.cpu_count()} cores (load average {facts['load']} at the start of the "
        f"last run, {_bench.load_average()} now), torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads); {facts['provenance']}.",
        "",
        f"Model: `{cfg['model']}`; one FedSGD step per batch; sentences truncated to "
        f"{cfg['max_len']} tokens; selection `{cfg['select']}` (seed {cfg['select_seed']}), batch "
        f"k of size B = selected sentences kB..kB+B-1, up to {cfg['batches']} batches per cell "
        "(column `batches`: how many ran); "
        f"{cfg['steps']} continuous steps for every attack; labels and lengths "
        f"{known}; "
        f"n-gram prior on `{cfg['prior_corpus']}`. Attacks: {attacks}; extra options "
        f"{cfg['attack_options'] or 'none'}.",
        "",
        "Data: " + "; ".join(f"{k}: {v}" for k, v in facts["data"].items()) + ".",
        "",
        "ROUGE F ×100 after Hungarian matching on ROUGE-1: `lamp` = LAMP-compatible decoding "
        "([CLS]/[SEP] kept, as the published numbers), `clean` = special tokens removed. "
        "`token acc`: share of true word positions recovered exactly. `feature cos`: mean |cos| "
        "of recovered and true pooler inputs h[:rd] (pooler attacks). `published`: R-1 / R-2 / "
        "R-L of the pooler paper's results file (BERT-base, 2,000 steps, oracle pairing; "
        "Pooler-honest beside its Ours-tanh row): for reference, not comparable one to one.",
        "",
        "| dataset | attack | B | batches | R-1 lamp | R-2 lamp | R-L lamp | R-1 clean | "
        "R-2 clean | R-L clean | token acc | feature cos | s / batch | published R-1/R-2/R-L |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.to_dict("records"):
        lines.append(
            f"| {r['dataset']} | {r['attack']} | {r['B']} | {r['batches']} "
            + "".join(f"| {_bench.cell(100 * r[f], 1)} " for f in SCORES[:6])
            + f"| {_bench.cell(r['token_acc'], 3)} | {_bench.cell(r['feature_cos'], 3)} "
            f"| {r['seconds']:.1f} | {published(r['dataset'], r['attack'], r['B'])} |"
        )
    lines += ["", *verdict(summary, rows, cfg), "", facts["reference"], ""]
    return "\n".join(lines)


def reference(cfg: dict, data: dict) -> str:
    """What the bag of tokens alone scores: every word position a draw from the batch's bag."""
    task = data["task"]
    tok = hf.tokenizer(task.tokenizer)
    specials = torch.tensor([tok.pad_token_id, tok.cls_token_id, tok.sep_token_id])
    parts = []
    for name in cfg["datasets"]:
        sentences, labels, _ = data[name]
        cells = []
        for size in cfg["batch_sizes"]:
            rng = seeding.rng(cfg["seed"], "reference", name, size)  # whatever else runs
            scores = []
            for k in range(cfg["batches"]):
                picked = list(range(k * size, (k + 1) * size))
                batch = encode([sentences[i] for i in picked], labels[picked], task)
                words = ~torch.isin(batch.inputs, specials)
                bag = batch.inputs[words].unique()
                guess = batch.inputs.clone()
                guess[words] = bag[torch.randint(len(bag), (int(words.sum()),), generator=rng)]
                found = Reconstruction(inputs=guess, labels=batch.labels)
                scores.append(metrics.score(found, batch, task)["rouge1_lamp"])
            cells.append(f"{100 * results.mean(pd.Series(scores)):.1f}")
        parts.append(f"{name} {' / '.join(cells)}")
    sizes = " / ".join(str(b) for b in cfg["batch_sizes"])
    return (
        "Reference, no attack beyond the bag: every word position a uniform draw from the "
        "batch's bag of tokens (which every attack here reads off the update), lengths known, "
        f"scores R-1 (lamp) {'; '.join(parts)} at B = {sizes}, over each cell's first "
        f"{cfg['batches']} batches (the table's cells may hold fewer)."
    )


def published(dataset: str, attack: str, size: int) -> str:
    # The published pooler rows come from oracle pairing: an ablation's oracle row shares them.
    table = PUBLISHED.get(dataset, {}).get(attack.removesuffix("-oracle"))
    if table is None or size not in PUBLISHED_B:
        return "n/a"
    i = PUBLISHED_B.index(size)
    return " / ".join(f"{row[i]:.1f}" for row in table)


def verdict(summary: pd.DataFrame, rows: pd.DataFrame, cfg: dict) -> list[str]:
    """The issue's criterion: Pooler vs LAMP (R-1, mean over B = 2 and 4) and LAMP vs TAG, per
    data set and over all of them, on the cells that hold LAMP rows (named, with their batches).

    Each difference is the mean per-batch paired difference (the same sentences attacked both
    ways) with its standard error, since batches differ far more than attacks do."""
    r1_of = 100 * rows.set_index(["dataset", "B", "batch", "attack"])["rouge1_lamp"].unstack()
    names = list(cfg["datasets"])
    lines = []
    for scope in [*names, "all"] if len(names) > 1 else names:
        datasets = names if scope == "all" else [scope]
        cells = {
            (r["dataset"], r["B"], r["attack"]): r
            for r in summary.to_dict("records")
            if r["dataset"] in datasets and r["B"] in (2, 4)
        }
        where = [(d, b) for d in datasets for b in (2, 4) if (d, b, "LAMP") in cells]
        if not where:
            lines.append(f"- {scope}: no LAMP rows at B = 2 or 4 yet.")
            continue

        def r1(attack: str, where: list = where, cells: dict = cells) -> float:
            found = [
                cells[(d, b, attack)]["rouge1_lamp"] for d, b in where if (d, b, attack) in cells
            ]
            return 100 * results.mean(pd.Series(found, dtype=float))

        def gain(attack: str, than: str = "LAMP", where: list = where) -> str:
            # Paired within each cell: the mean difference over the batches both attacked (a
            # partial cell is compared on its own batches); cells weigh equally, as the means.
            if attack not in r1_of or than not in r1_of:
                return "n/a"
            diffs = (r1_of[attack] - r1_of[than]).dropna()
            per_cell = diffs.groupby(level=["dataset", "B"]).agg([results.mean, "sem"])
            per_cell = per_cell[per_cell.index.isin(where)]
            if per_cell.empty:
                return "n/a"
            mean = f"{results.mean(per_cell['mean']):+.1f}"
            error = math.hypot(*per_cell["sem"]) / len(per_cell)
            return mean if math.isnan(error) else f"{mean} ± {error:.1f}"

        lamp, tag = r1("LAMP"), r1("TAG")
        gains = ", ".join(
            f"{a['label']} {gain(a['label'])}"
            for a in cfg["attacks"]
            if a["label"].startswith("Pooler")
        )
        prefix = "{} " if scope == "all" else ""  # name the data set when there are several
        over = "; ".join(
            f"{prefix.format(d)}B = {b} ({_batches(cells[(d, b, 'LAMP')]['batches'])})"
            for d, b in where
        )
        versus = (  # an ablation may run without TAG
            ""
            if math.isnan(tag)
            else f", TAG {_bench.cell(tag, 1)} (LAMP - TAG {gain('LAMP', 'TAG')})"
        )
        lines.append(
            f"- {'all data sets' if scope == 'all' else scope}, R-1 (lamp) mean over {over}: LAMP "
            f"{_bench.cell(lamp, 1)}{versus}; pooler attacks vs LAMP: {gains} (target: >= +5)."
        )
    lines.append(
        "(Differences are paired: in each cell the mean over the batches both attacks ran, the "
        "same sentences attacked both ways; cells weigh equally; ± the standard error.)"
    )
    return lines


def _batches(n: int) -> str:
    return "1 batch" if n == 1 else f"{n} batches"


# -- timing ---------------------------------------------------------------------------------
def timing(cfg: dict, data: dict, out: Path) -> str:
    """Seconds per continuous step, initial candidate and discrete step; full-run estimates."""
    task = data["task"]
    name = next(iter(cfg["datasets"]))
    sentences, labels, _ = data[name]
    rows, specs = [], {a["label"]: a for a in cfg["attacks"]}
    for size in cfg["batch_sizes"]:
        batch = encode(sentences[:size], labels[:size], task)
        for label in ("LAMP", "Pooler-SELU"):
            if label not in specs:
                continue
            spec = specs[label]
            view = server_view(data["model"], spec, cfg, batch, task, seeding.rng(0, "t"))

            def run(steps_: int, spec=spec, view=view, batch=batch, **options) -> float:
                name = spec["attack"]["name"]
                extra = {name: {**cfg["attack_options"].get(name, {}), **options}}
                local = {**cfg, "attack_options": extra, "steps": steps_}
                attack = attack_of(spec, local, batch, task)
                start = time.perf_counter()
                attack(view, seeding.rng(0, "timing"))
                return time.perf_counter() - start

            plain = dict(init_candidates=1, swap_every=0)
            run(**plain, steps_=2)  # warm-up: the prior, the tokenizer, allocations
            base = run(**plain, steps_=5)
            step = (run(**plain, steps_=15) - base) / 10
            # 6 starts and 6 permutations of the best: 11 more gradients than one start
            init = (run(init_candidates=6, swap_every=0, steps_=5) - base) / 11
            # discrete steps at steps 1 and 3, 6 candidates for each of the B sentences
            swaps = run(
                init_candidates=1, swap_every=2, swap_burnin=0.0, swap_candidates=6, steps_=5
            )
            swap = (swaps - base) / (2 * 6 * size)
            rows.append(
                {
                    "label": label,
                    "B": size,
                    "step": step,
                    "init": init,
                    "swap": swap,
                    "fixed": base - 5 * step,
                }
            )
    return timing_page(cfg, rows, out)


def _swap_events(steps: int, every: int = 75, burnin: float = 0.1) -> int:
    return sum(1 for s in range(steps) if s >= burnin * steps and s % every == 1 % every)


def timing_page(cfg: dict, rows: list[dict], out: Path) -> str:
    lines = [
        "# Cost of the text attacks on MiniLM",
        "",
        f"Machine: {os.cpu_count()} cores (load average {_bench.load_average()}), torch "
        f"{torch.__version__} ({torch.get_num_threads()} intra-op threads), {_bench.commit()}, "
        f"{datetime.now().isoformat(timespec='seconds')}. Model `{cfg['model']}`; first "
        "sentences of the first data set.",
        "",
        "Seconds per continuous step (double backward through the model), per initial "
        "candidate (one gradient), and per discrete-step candidate per sentence (one "
        "sentence's gradient), from differences of short runs; `fixed` = set-up per batch "
        "(stage 1 for the pooler attack, the prior, label and bag recovery).",
        "",
        "| attack | B | s / step | s / init candidate | s / swap candidate | fixed s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['B']} | {r['step']:.3f} | {r['init']:.3f} | {r['swap']:.3f} "
            f"| {r['fixed']:.1f} |"
        )
    lines += [
        "",
        "Estimated time of the full benchmark (3 data sets, every B above, 10 batches per cell; "
        "TAG = steps only; LAMP and the pooler attacks = 2 × 20 initial candidates, steps, and "
        "50 candidates per sentence at each discrete step (every 75 steps after 10 %); the "
        "pooler rows cost as Pooler-SELU's, the honest one as LAMP's):",
        "",
        "| steps | hours |",
        "|---|---|",
    ]
    costs = {(r["label"], r["B"]): r for r in rows}
    for steps in (50, 100, 200):
        total = 0.0
        for size in cfg["batch_sizes"]:
            lamp = costs.get(("LAMP", size))
            pool = costs.get(("Pooler-SELU", size), lamp)
            if lamp is None:
                continue
            swaps = _swap_events(steps)

            def full(c: dict, size: int = size, steps: int = steps, swaps: int = swaps) -> float:
                return (
                    c["fixed"] + 40 * c["init"] + steps * c["step"] + swaps * size * 50 * c["swap"]
                )

            tag = lamp["fixed"] + steps * lamp["step"]
            total += 10 * 3 * (tag + 2 * full(lamp) + 2 * full(pool))
        lines.append(f"| {steps} | {total / 3600:.1f} |")
    page = "\n".join(lines) + "\n"
    _bench.atomic(out / TIMING, page)
    return page


def key(row: dict) -> tuple:
    """What a runs row measured: (dataset, B, batch, attack), as :func:`cells` lists them."""
    return row["dataset"], int(row["B"]), int(row["batch"]), row["attack"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--quick", action="store_true", help="tiny BERT, B = 1, 2, 1 batch")
    parser.add_argument("--timing", action="store_true", help="measure costs, estimate, stop")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--data-root", help="folder with the data files (default: config)")
    parser.add_argument("--datasets", nargs="+", help="data sets from the config")
    parser.add_argument("--file", nargs="+", help="DATASET=PATH: read that data set from PATH")
    parser.add_argument("--select", help="shuffle (LAMP's protocol) or first")
    parser.add_argument("--select-seed", dest="select_seed", type=int)
    parser.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+")
    parser.add_argument("--batches", type=int, help="batches per (dataset, B, attack)")
    parser.add_argument("--steps", type=int, help="continuous steps of every attack")
    parser.add_argument("--max-len", dest="max_len", type=int, help="tokens per sentence")
    parser.add_argument("--attacks", nargs="+", help="labels from the config's [[attacks]]")
    parser.add_argument("--unknown", action="store_true", help="recover labels and lengths")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    _bench.add_device_option(parser)
    parser.add_argument(
        "--report", action="store_true", help="only rewrite the tables from the rows in --out"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="DIR",
        help="add the rows of parallel runs' --out folders that --out lacks, then --report",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = settings(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    task = task_of(cfg)
    data: dict = {"task": task, "model": base_model(cfg, task)}
    for name in cfg["datasets"]:
        data[name] = load_sentences(cfg, name, args.quick)
    if args.timing:
        print(timing(cfg, data, out))
        return
    facts = {
        "load": _bench.load_average(),
        "commit": _bench.commit(),
        "data": {name: data[name][2] for name in cfg["datasets"]},
        "reference": reference(cfg, data),
    }
    runs = out / RUNS
    if args.merge:
        added = _bench.merge_rows(runs, args.merge, key, RUN_FIELDS)
        print(f"merged {added} rows into {runs}", flush=True)
    if args.report or args.merge:
        rows = _bench.read_runs(runs, RUN_FIELDS)
        _bench.check_budget(rows["steps"], cfg["steps"], runs)
        print(write_tables(out, cfg, rows, facts))
        return
    done = {key(r) for r in _bench.read_rows(runs)}
    todo = [c for c in cells(cfg) if c not in done]
    print(f"{len(done)} rows already in {runs}; {len(todo)} to run", flush=True)
    for name, size, k, label in todo:
        row = run_one(cfg, data, name, size, k, label, args.device)
        row = _bench.stamp(row, facts["commit"], args.device)
        _bench.append_row(runs, row, RUN_FIELDS)
        print(
            f"{name} B={size} batch {k} {label}: R-1 {100 * row['rouge1_lamp']:.1f} (clean "
            f"{100 * row['rouge1']:.1f}) R-2 {100 * row['rouge2_lamp']:.1f} token acc "
            f"{row['token_acc']:.2f} feature cos {row['feature_cos']:.3f} {row['seconds']:.1f} s",
            flush=True,
        )
        write_tables(out, cfg, _bench.read_runs(runs, RUN_FIELDS), facts)
    print(write_tables(out, cfg, _bench.read_runs(runs, RUN_FIELDS), facts))


if __name__ == "__main__":
    sys.exit(main())
