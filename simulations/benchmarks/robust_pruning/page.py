"""The Markdown page of the robust-pruning benchmark, from its three runs files."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _bench
import pandas as pd

SETTINGS = """\
Settings (CPU-sized; the papers use BERT-base/large on the full data sets):

* model: the bundled all-MiniLM-L6-v2 with a new 2-class head, fine-tuned on the first 1,000
  sentences of `sst2_train_first2000.tsv` (AdamW, lr 1e-4, batch 32, 2 epochs, 48 tokens);
* calibration (KRP, SparseGPT): the next 256 training sentences (the KRP code: 2,560);
* pruned: the six linear layers of every encoder block, uniformly; embeddings, pooler and
  classifier dense; no retraining in (a);
* KRP = ridge refit to the dense outputs (λ = 1e-4 · mean diag) + adaptive Hessian + SparseGPT's
  solver (the authors' exact OBC takes 3.6 min for one 384 × 384 layer on one thread here, so the
  whole model was out of reach); SparseGPT = the same loop without refit, one Hessian per block;
  magnitude = per-matrix |w| top-k;
* evaluation: `dev_accuracy` on all 436 sentences of `sst2_dev_first436.tsv`, the attack on
  the same 436 (the first run: their first 80): `fedleak.robustness.word_substitution`
  (TextFooler-style, offline: 50 nearest whole words in MiniLM's input embeddings with cosine
  >= 0.4, MiniLM sentence cosine >= 0.8, coarse POS filter, stop words kept, at most 5 words and
  30 % of the sentence changed).  `clean` is the accuracy on the attacked sentences, `aua` the
  accuracy under attack, `asr` = successes / correctly classified, `perturbed` the mean % of
  words changed in successful examples, `queries` the mean victim queries per attacked sentence.
  TextAttack's own TextFooler recipe cannot run here (it downloads its embeddings, the Universal
  Sentence Encoder and NLTK's tagger at run time): see `fedleak/robustness/__init__.py`.
"""

B_SETTINGS = """\
Schedule 50 -> 70 -> 90 %, distillation from the dense model (soft cross-entropy on logits, AdamW
lr 2e-4, batch 16, the mask re-applied after every step).  `randomized`: 3 candidates per stage at
randomness levels 1e-5 / 5e-5 / 2e-4 (draws = (n - k) · r per matrix, p ∝ |w|^5), each distilled
`quick` steps from the stage's start and scored on 128 held-out training sentences (`early_*`:
their spread), the best then distilled `full` steps; `deterministic` (IMP): the magnitude mask.
Two budget protocols: `equal` (quick 8, full 16) gives IMP as many steps per stage as randomized's
candidates and winner together (3 × 8 + 16 = 40), so exploring costs randomized training;
`paper` (quick 16, full 64) gives IMP the winner's steps only (64 vs 3 × 16 + 64 = 112), as the
authors compare (`experiment.py` against `experiment_soups_quickcall.py`: candidate evaluation is
overhead on top of the same training).  `heldout`: accuracy on the held-out split after the stage;
`dev_accuracy` (`dev_*`) on the 436 dev sentences after the last stage; `distance_mean`: mean
Hamming distance of the candidates to the magnitude mask.  A seed draws the masks, the order of
the distillation batches and the dropout; both methods share it.
"""

C_SETTINGS = """\
`simulations/robust_pruning_federated.toml` from the fine-tuned MiniLM: 8 clients of 50 SST-2
sentences (16 tokens), 2 per round, one FedSGD step on 4 sentences (lr 0.03); `dense` sends its
state, `randomized` and `krp` prune 50 % of every encoder weight first (server: sparse_fedavg).
The server widens the pooler (2,048 units) and attacks one client's round-1 update (LAMP and the
pooler attack, 50 steps each, n-gram prior from WikiText-2); a seed is the experiment's (other
sampled clients, batches and masks).  `global_accuracy`: the global model after the round on the
436 dev sentences; `sent_accuracy` / `sent_sparsity`: of the state the observed client sent;
ROUGE in LAMP's convention and token accuracy, in %.  Caveat: under the malicious server's
widened pooler (random SELU rows feeding the classifier) every sent state predicts the majority
class (52.3 % of the dev set), and the global model after one round of two clients is not far above:
these utility columns say little about pruning; its utility cost on the honest model is what (a)
measures.
"""


CAVEATS = """
## What was tried, and how far to trust it

* Noise in (a): 436 attacked sentences, binomial standard error ~2.3 points on `aua`; every
  method is attacked on the same sentences, so differences between methods are tighter than
  that, but not by much.  The first run on 80 sentences (kept above) gave the same order except
  SparseGPT vs magnitude at 50 %, with every `aua` 4-8 points higher (dense 47.5 there, 40.8 on
  all 436): its first 80 sentences are easier to hold.
* Accuracy under attack rewards a model that has stopped reading its input: magnitude at 70 / 90 %
  (dev 58.9 / 50.2 %) is flipped less often (`asr` 26 / 20 %) than the dense model, so `aua` must
  be read beside the clean accuracy, as the KRP paper does (Acc / Aua / Asr together).  By that
  reading KRP keeps the most clean accuracy at 30-90 % but is the easiest to flip at every
  sparsity, catastrophically at 90 % (`asr` 76 %): the refit to the dense outputs preserves what
  the dense model computes, fragility included, and at 90 % leaves a model that is right for
  brittle reasons.  The claim (KRP keeps more accuracy under attack) is not reproduced here.
* The attack: first run with TextFooler's word-cosine threshold 0.5 and 30 candidates, which on
  MiniLM's input embeddings left few substitutes (dense Asr 26.9 % on 80 sentences); the tables
  use 0.4 and 50 candidates.  MiniLM's embeddings do not push antonyms apart as TextFooler's
  counter-fitted vectors do ("good" -> "bad" is a neighbour at 0.53), so some "successful"
  substitutions change the true sentiment: Asr overstates a human-valid attack the same way for
  every method.  The cap (5 words, 30 %) is tighter than TextFooler's (none).
* KRP's solver: the rows `krp` use SparseGPT's solver after the refit, so the KRP-vs-SparseGPT
  difference is exactly the refit to the dense outputs plus the per-layer Hessian.  `krp_obc`
  (KRP with the authors' exact OBC: one weight at a time per row, 32 rows in parallel; its cost
  grows like d^3 per row, so the 1,536-input output layers dominate) was started at 50 % and
  stopped unfinished after 105 CPU-minutes on a quiet core, so it has no row.
* Randomized masks in (b) at CPU budgets: 3 candidates per stage (the authors' scripts: 8),
  early evaluation of 8 or 16 distillation steps (theirs: one epoch, scored by the mean of the
  last ten evaluations), logits only in the distillation (theirs: hidden states and attention
  maps too).  Under the `equal` protocol exploring costs the winner most of its training and
  randomized loses clearly at 90 % (-7.1 points of dev accuracy over 3 seeds); under the
  authors' `paper` protocol (IMP trains as long as the winner, selection is extra) it ties
  (-0.5: -0.2 / -1.8 / +0.5 per seed; +0.7 on the held-out split the selection saw).  The claim
  (randomized beats the deterministic mask at the highest sparsity) is not reproduced here.
  At 90 % after 8 early steps all candidates can sit at the majority class (seed 0: `early_std`
  0), so the selection is blind there; after 16 steps they spread over 3-9 points.
  Levels 1e-5 / 5e-5 / 2e-4 give 3-106 draws per 384 x 1,536 matrix; a candidate differs from
  the magnitude mask on 1.9-3.1 % of the 10.6 M pruned-layer weights (`distance_mean`).
* (c): pruning half of every encoder weight before sending does not stop LAMP or the pooler
  attack: their ROUGE-1 on pruned updates is within the seeds' spread of the dense update's.
  The pooler attack reads the widened pooler's gradient, which the clients do not prune.
* No robust dense "soup" (KRP's optional stage A, `krp.greedy_soup`) was built: it needs several
  fine-tuned checkpoints (FreeLB variants in the paper) and their attacked accuracy each.
* The 436-sentence rows, (b) and (c)'s seeds 1-2 ran niced, one thread each, on a quiet machine
  (load ~2): one attacked model takes 1.5-3 min, a KRP prune 15 s, a (b) run 1.3-5.2 min.  The
  first run (80 sentences) and (c)'s seed 0 ran at load 20-37.
"""


def _table(frame: pd.DataFrame, columns: list[str], digits: int = 1) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for c in columns:
            v = row[c]
            cells.append(_bench.cell(v, digits) if isinstance(v, float) else str(v))
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def write_page(out: Path) -> str:
    """Write ``robust_pruning.md`` in ``out`` from the runs files there; return the text."""
    parts = ["# Robust and randomized pruning of MiniLM on SST-2\n", SETTINGS]
    oneshot = out / "oneshot_runs.csv"
    if oneshot.is_file():
        parts.append(_oneshot(pd.read_csv(oneshot)))
    rand = out / "randomized_runs.csv"
    if rand.is_file():
        parts.append(_randomized(pd.read_csv(rand)))
    fed = out / "federated_runs.csv"
    if fed.is_file():
        parts.append(_federated(pd.read_csv(fed)))
    parts.append(CAVEATS)
    parts.append(f"\nMachine: 2 cores (load {_bench.load_average()} when the page was written).\n")
    text = "\n".join(parts)
    _bench.atomic(out / "robust_pruning.md", text)
    return text


def _oneshot(frame: pd.DataFrame) -> str:
    """Part (a): the rows of the largest attack set, the earlier smaller run beside them."""
    frame["sparsity"] = (100 * frame["sparsity"]).round().astype(int)
    frame = frame.sort_values(["sparsity", "method"])
    n = int(frame["attacked"].max())
    main = frame[frame["attacked"] == n].copy()
    # Binomial standard error of the accuracy under attack, in points, for n sentences.
    p = main["aua"] / 100
    main["aua_se"] = 100 * (p * (1 - p) / n) ** 0.5
    text = ["## (a) One-shot pruning: accuracy and robustness\n"]
    text.append(
        f"The attack on the first {n} dev sentences (`aua_se`: its binomial standard error).\n"
    )
    text.append(
        _table(
            main,
            [
                "sparsity",
                "method",
                "dev_accuracy",
                "clean",
                "aua",
                "aua_se",
                "asr",
                "perturbed",
                "queries",
                "prune_seconds",
            ],
        )
    )
    for krp in ("krp", "krp_obc"):
        gaps = []
        for sparsity, cell in main[main["sparsity"] >= 50].groupby("sparsity"):
            aua = cell.set_index("method")["aua"]
            if {krp, "sparsegpt", "magnitude"} <= set(aua.index):
                gap = aua[krp] - max(aua["sparsegpt"], aua["magnitude"])
                gaps.append(f"{sparsity} %: {gap:+.1f}")
        if gaps:
            text.append(
                f"\n`{krp}`'s accuracy under attack minus the better of SparseGPT and magnitude: "
                + ", ".join(gaps)
                + " points.\n"
            )
    text.append(f"\nProvenance: {_bench.provenance(_stamped(main))}.\n")
    earlier = frame[frame["attacked"] < n]
    for m, run in earlier.groupby("attacked"):
        text.append(f"\nThe first run, on the first {m} of those sentences (same pruned models):\n")
        text.append(_table(run, ["sparsity", "method", "dev_accuracy", "clean", "aua", "asr"]))
    return "\n".join(text)


def _randomized(frame: pd.DataFrame) -> str:
    """Part (b): every seed's stages, then the mean and spread over seeds."""
    frame["sparsity"] = (100 * frame["sparsity"]).round().astype(int)
    frame = frame.sort_values(
        ["protocol", "method", "seed", "stage"], ascending=[True, False, True, True]
    )
    seeds = frame["seed"].nunique()
    text = ["\n## (b) Iterative pruning: randomized masks vs the deterministic mask\n"]
    text.append(B_SETTINGS)
    summary = (
        frame.groupby(["protocol", "method", "stage", "sparsity"], sort=False)
        .agg(
            steps=("steps", "first"),
            seeds=("seed", "nunique"),
            heldout_mean=("heldout", "mean"),
            heldout_std=("heldout", lambda x: x.std(ddof=0)),
            early_spread=("early_std", "mean"),
            dev_mean=("dev_accuracy", "mean"),
            dev_std=("dev_accuracy", lambda x: x.std(ddof=0)),
        )
        .reset_index()
    )
    summary["seeds"] = summary["seeds"].astype(str)
    text.append(
        f"Mean and spread (std) over {seeds} seed(s); `early_spread`: the mean std of the "
        "candidates' early scores within a stage.\n"
    )
    text.append(
        _table(
            summary,
            [
                "protocol",
                "method",
                "stage",
                "sparsity",
                "steps",
                "seeds",
                "heldout_mean",
                "heldout_std",
                "early_spread",
                "dev_mean",
                "dev_std",
            ],
        )
    )
    last = frame[frame["stage"] == frame["stage"].max()]
    for protocol, run in last.groupby("protocol"):
        by_seed = run.pivot(index="seed", columns="method", values="dev_accuracy")
        if {"randomized", "deterministic"} <= set(by_seed.columns):
            diff = (by_seed["randomized"] - by_seed["deterministic"]).dropna()
            text.append(
                f"\nAt {run['sparsity'].max()} %, protocol `{protocol}`, randomized minus "
                f"deterministic dev accuracy per seed: {', '.join(f'{d:+.1f}' for d in diff)} "
                f"(mean {diff.mean():+.1f}).\n"
            )
    text.append("\nEvery seed and stage:\n")
    text.append(
        _table(
            frame,
            [
                "protocol",
                "method",
                "seed",
                "stage",
                "sparsity",
                "steps",
                "candidates",
                "early_min",
                "early_max",
                "early_std",
                "distance_mean",
                "heldout",
                "dev_accuracy",
            ],
        )
    )
    text.append(f"\nProvenance: {_bench.provenance(_stamped(frame))}.\n")
    return "\n".join(text)


def _federated(frame: pd.DataFrame) -> str:
    """Part (c): the mean and spread over seeds per (variant, attack), then every run."""
    seeds = frame["seed"].nunique()
    text = ["\n## (c) Pruning before sending as a defense (federated run)\n", C_SETTINGS]
    metrics = ["global_accuracy", "sent_sparsity", "rouge1_lamp", "rouge2_lamp", "token_acc"]
    # Variants in the order the runs file first holds them (dense first), in every table.
    variants = frame["variant"].unique()
    frame["variant"] = pd.Categorical(frame["variant"], variants, ordered=True)
    summary = (
        frame.groupby(["attack", "variant"], observed=True)[metrics]
        .agg(["mean", lambda x: x.std(ddof=0)])
        .reset_index()
    )
    summary.columns = [
        f"{a}_{'std' if b == '<lambda_0>' else b}" if b else a for a, b in summary.columns
    ]
    summary["seeds"] = str(seeds)
    text.append(f"Mean and spread (std) over {seeds} seed(s), one attacked client each:\n")
    text.append(
        _table(
            summary,
            [
                "attack",
                "variant",
                "seeds",
                "global_accuracy_mean",
                "sent_sparsity_mean",
                "rouge1_lamp_mean",
                "rouge1_lamp_std",
                "rouge2_lamp_mean",
                "rouge2_lamp_std",
                "token_acc_mean",
                "token_acc_std",
            ],
        )
    )
    text.append("\nEvery run:\n")
    columns = [c for c in frame.columns if c not in _bench.STAMP]
    text.append(_table(frame.sort_values(["seed", "variant"]), columns))
    text.append(f"\nProvenance: {_bench.provenance(_stamped(frame))}.\n")
    return "\n".join(text)


def _stamped(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in ("finished", "commit", "device"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame


if __name__ == "__main__":
    print(write_page(_bench.REPO / "simulations/benchmarks/results/robust_pruning"))
