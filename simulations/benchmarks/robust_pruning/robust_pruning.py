"""Robust and randomized pruning of a fine-tuned MiniLM on SST-2, and pruning as an FL defense.

Papers: KRP (Li, Lei, Cheng & Xu, EMNLP 2023) and randomized masks (Li, Gao, Lei & Xu, Findings
of EMNLP 2023); see ``fedleak/pruning/krp.py`` and ``fedleak/pruning/randomized.py``.

Setting (CPU-sized; the papers use BERT-base/large and the full data sets):

* model: the bundled all-MiniLM-L6-v2 (6 layers, hidden 384) with a new classification head,
  fine-tuned centrally on the first ``--train`` sentences of ``sst2_train_first2000.tsv``
  (AdamW, lr 1e-4, batch 32, ``--epochs`` epochs, 48 tokens), cached under
  ``~/.cache/fedleak/robust_pruning`` (never committed);
* calibration: ``--calibration`` further training sentences (KRP: 2,560 in the paper);
* evaluation: clean accuracy on all 436 sentences of ``sst2_dev_first436.tsv``; the word
  substitution attack (``fedleak.robustness.word_substitution``, TextFooler-style, offline) on
  its first ``--attacked`` sentences.

Parts (one resumable runs file each, rows appended as they finish, a rerun skips them):

* ``oneshot`` (a): sparsity 30 / 50 / 70 / 90 % of every encoder linear layer, KRP (ridge refit
  + adaptive Hessian, SparseGPT's solver), SparseGPT (same loop, no refit, one Hessian per
  block) and one-shot magnitude; no retraining.
* ``randomized`` (b): the iterative schedule ``--schedule`` with distillation from the dense
  model; randomized masks (best of ``--candidates`` at randomness levels ``--ratios``, each
  given ``--quick`` steps and scored on a held-out split carved from the training data, then
  ``--full`` steps for the winner) against the deterministic magnitude mask (IMP), given the
  same steps per stage (``--protocol equal``: candidates x quick + full) or the winner's only
  (``paper``, as the authors compare); ``--seed`` draws the masks, batch order and dropout; rows
  at every stage.
* ``federated`` (c): see ``federated.py`` beside this file.

    nice -n 5 .venv/bin/python simulations/benchmarks/robust_pruning/robust_pruning.py oneshot
    ... oneshot --sparsities 0.7 0.3      # a second worker on other cells (same runs file)
    ... oneshot --sparsities 0.5 --oneshot-methods krp_obc   # KRP with exact OBC
    ... randomized --seed 1 [--methods deterministic]
    ... randomized --protocol paper --quick 16 --full 64 --seed 1
    ... page      # rewrite the Markdown page from the runs files

The defaults are the committed run's settings.  On a quiet 2-core machine, one thread: (a)
about 3 min per cell (a KRP prune 15 s, the attack on 436 sentences 1.5-3 min), (b) 1.3-5 min
per method, seed and protocol.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench
import pandas as pd
import torch

from fedleak import hf, seeding
from fedleak.core import Task
from fedleak.models import MODELS
from fedleak.pruning import krp, randomized
from fedleak.robustness import word_substitution as ws

OUT = _bench.REPO / "simulations/benchmarks/results/robust_pruning"
CACHE = Path(os.environ.get("FEDLEAK_CACHE") or Path.home() / ".cache" / "fedleak") / (
    "robust_pruning"
)
MAX_LEN = 48
ONESHOT = [
    "method",
    "sparsity",
    "dev_accuracy",
    "clean",
    "aua",
    "asr",
    "perturbed",
    "queries",
    "attacked",
    "prune_seconds",
    "attack_seconds",
    *_bench.STAMP,
]
RANDOMIZED = [
    "method",
    "protocol",
    "seed",
    "stage",
    "sparsity",
    "steps",
    "candidates",
    "early_best",
    "early_min",
    "early_max",
    "early_std",
    "distance_mean",
    "heldout",
    "dev_accuracy",
    "seconds",
    *_bench.STAMP,
]


def data_root(args) -> Path:
    return Path(args.data or os.environ.get("FEDLEAK_DATA_ROOT") or "/work/shared/data")


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    frame = pd.read_csv(path, sep="\t", quoting=3)
    return [s.strip() for s in frame["sentence"]], frame["label"].astype(int).tolist()


def tokenize(sentences: list[str]) -> torch.Tensor:
    enc = hf.tokenizer()(
        sentences, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"
    )
    return enc["input_ids"]


class Setup:
    """The data splits, the fine-tuned dense model and the evaluation helpers."""

    def __init__(self, args) -> None:
        root = data_root(args)
        train_s, train_y = read_tsv(root / "sst2_train_first2000.tsv")
        dev_s, dev_y = read_tsv(root / "sst2_dev_first436.tsv")
        n, c, h = args.train, args.calibration, args.heldout
        if n + c + h > len(train_s):
            raise SystemExit(f"--train + --calibration + --heldout exceed {len(train_s)} sentences")
        self.args = args
        self.train = (tokenize(train_s[:n]), torch.tensor(train_y[:n]))
        self.calibration = tokenize(train_s[n : n + c])
        self.heldout = (
            tokenize(train_s[n + c : n + c + h]),
            torch.tensor(train_y[n + c : n + c + h]),
        )
        self.dev = (tokenize(dev_s), torch.tensor(dev_y))
        self.attack_set = (dev_s[: args.attacked], dev_y[: args.attacked])
        self.task = Task("text", (MAX_LEN,), 2, tokenizer=hf.tokenizer_dir())
        self.dense = self._dense()

    def build(self):
        with seeding.isolated(0, "robust_pruning", "model"):
            return MODELS["bert"]()(self.task)

    def _dense(self):
        a = self.args
        path = CACHE / f"dense_n{a.train}_e{a.epochs}_len{MAX_LEN}.pt"
        model = self.build()
        if path.is_file():
            model.load_state_dict(torch.load(path))
            return model.eval()
        rng = seeding.rng(0, "robust_pruning", "finetune")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids, labels = self.train
        model.train()
        for epoch in range(a.epochs):
            order = torch.randperm(len(ids), generator=rng)
            for s in range(0, len(ids), 32):
                idx = order[s : s + 32]
                loss = torch.nn.functional.cross_entropy(model(ids[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            print(f"fine-tune epoch {epoch + 1}: loss {loss.item():.3f}", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        return model.eval()

    @torch.no_grad()
    def accuracy(self, model, split) -> float:
        model.eval()
        ids, labels = split
        preds = torch.cat([model(ids[s : s + 64]).argmax(1) for s in range(0, len(ids), 64)])
        return 100 * float((preds == labels).float().mean())

    def robustness(self, model) -> tuple[ws.Report, float]:
        start = time.perf_counter()
        attack = ws.WordSubstitution()
        predict = ws.classifier_predict(model, MAX_LEN)
        report, _ = ws.evaluate(attack, predict, *self.attack_set)
        return report, time.perf_counter() - start


def prune_oneshot(setup: Setup, method: str, sparsity: float):
    model = copy.deepcopy(setup.dense)
    start = time.perf_counter()
    if method == "magnitude":
        with torch.no_grad():
            for layer in krp.prunable(model).values():
                layer.weight.mul_(krp.magnitude_mask(layer.weight, sparsity))
    elif method != "dense":
        refit = method.startswith("krp")  # krp_obc: KRP with the authors' exact OBC solver
        solver = "obc" if method == "krp_obc" else "sparsegpt"
        config = krp.LayerwiseConfig(sparsity, solver=solver, refit=refit, sequential=refit)
        krp.prune_layerwise(model, setup.calibration, model.pad_id, config)
    return model, time.perf_counter() - start


def oneshot(args) -> None:
    runs = args.out / "oneshot_runs.csv"
    setup = Setup(args)
    measured = _bench.commit()
    cells = [("dense", 0.0)] + [(m, s) for s in args.sparsities for m in args.oneshot_methods]
    for method, sparsity in cells:
        # Read before every cell: another worker may share the runs file (disjoint cells).
        # A cell is done for one attack-set size: the 80-sentence rows of the first run stay.
        done = {
            (r["method"], float(r["sparsity"]), int(r["attacked"])) for r in _bench.read_rows(runs)
        }
        if (method, sparsity, len(setup.attack_set[0])) in done:
            continue
        model, prune_seconds = prune_oneshot(setup, method, sparsity)
        report, attack_seconds = setup.robustness(model)
        row = {
            "method": method,
            "sparsity": sparsity,
            "dev_accuracy": setup.accuracy(model, setup.dev),
            "clean": report.clean_accuracy,
            "aua": report.accuracy_under_attack,
            "asr": report.attack_success_rate,
            "perturbed": report.words_perturbed,
            "queries": report.queries,
            "attacked": report.examples,
            "prune_seconds": prune_seconds,
            "attack_seconds": attack_seconds,
        }
        _bench.append_row(runs, _bench.stamp(row, measured), ONESHOT)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


def randomized_part(args) -> None:
    runs = args.out / "randomized_runs.csv"
    done = {
        (r["method"], r["protocol"], int(r["seed"]))
        for r in _bench.read_rows(runs)
        if int(r["stage"]) == len(args.schedule)
    }
    setup = Setup(args)
    measured = _bench.commit()
    teacher = setup.dense
    ids = setup.train[0]
    # The seed draws the masks, the order of the distillation batches and the dropout.
    order = torch.randperm(len(ids), generator=seeding.rng(args.seed, "robust_pruning", "order"))
    batches = [ids[order[s : s + 16]] for s in range(0, len(ids), 16)]
    names = [f"{n}.weight" for n in krp.prunable(teacher)]
    n_cand = args.candidates
    # "equal": IMP trains as many steps per stage as the candidates and the winner together;
    # "paper": IMP trains as many as the winner (the authors' experiment.py), selection is extra.
    imp_steps = args.full + (n_cand * args.quick if args.protocol == "equal" else 0)

    def train(model, masks, steps):
        randomized.distill(model, teacher, batches, masks, steps, lr=args.lr)

    def evaluate(model):
        return setup.accuracy(model, setup.heldout)

    methods = {
        "randomized": (
            lambda w, s, rng: randomized.candidates(w, s, n_cand, args.ratios, args.alpha, rng),
            args.quick,
            args.full,
        ),
        "deterministic": (
            lambda w, s, rng: randomized.magnitude_candidates(w, s),
            0,
            imp_steps,
        ),
    }
    for method, (make, quick, full) in methods.items():
        if (method, args.protocol, args.seed) in done or method not in args.methods:
            continue
        rng = seeding.rng(args.seed, "robust_pruning", "masks")
        model = copy.deepcopy(teacher)
        start = time.perf_counter()
        with seeding.isolated(args.seed, "robust_pruning", "dropout"):
            _, stages = randomized.iterative_prune(
                model,
                names,
                args.schedule,
                lambda w, s, make=make, rng=rng: make(w, s, rng),
                train,
                evaluate,
                quick,
                full,
            )
        # The stages' rows come out together: the loop owns the model between stages.
        for i, stage in enumerate(stages, 1):
            scores = pd.Series(stage.scores, dtype=float)
            row = {
                "method": method,
                "protocol": args.protocol,
                "seed": args.seed,
                "stage": i,
                "sparsity": stage.sparsity,
                "steps": len(stage.scores) * quick + full,
                "candidates": max(len(stage.scores), 1),
                "early_best": scores.max() if len(scores) else math.nan,
                "early_min": scores.min() if len(scores) else math.nan,
                "early_max": scores.max() if len(scores) else math.nan,
                "early_std": scores.std(ddof=0) if len(scores) else math.nan,
                "distance_mean": sum(stage.distance) / len(stage.distance),
                "heldout": stage.final,
                "dev_accuracy": setup.accuracy(model, setup.dev) if i == len(stages) else math.nan,
                "seconds": time.perf_counter() - start,
            }
            _bench.append_row(runs, _bench.stamp(row, measured), RANDOMIZED)
            print(row, flush=True)


def page(args) -> None:
    from page import write_page  # beside this file

    write_page(args.out)


def build_parser() -> argparse.ArgumentParser:
    """The options of every part (federated.py reads the data and fine-tuning ones)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["oneshot", "randomized", "page"])
    parser.add_argument("--data", default="", help="folder of the SST-2 files")
    parser.add_argument("--out", type=Path, default=OUT, help="folder of the results")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--attacked", type=int, default=436)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument(
        "--oneshot-methods",
        nargs="+",
        choices=["krp", "krp_obc", "sparsegpt", "magnitude"],
        default=["krp", "sparsegpt", "magnitude"],
        help="part (a)'s methods (krp_obc: KRP with exact OBC, > 105 CPU-min at 50 %%)",
    )
    parser.add_argument("--schedule", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1e-5, 5e-5, 2e-4])
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--quick", type=int, default=8)
    parser.add_argument("--full", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0, help="part (b)'s seed")
    parser.add_argument(
        "--protocol",
        choices=["equal", "paper"],
        default="equal",
        help="part (b): IMP's steps per stage = all of randomized's, or its winner's only",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["randomized", "deterministic"], help="part (b)'s methods"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    {"oneshot": oneshot, "randomized": randomized_part, "page": page}[args.part](args)


if __name__ == "__main__":
    main()
