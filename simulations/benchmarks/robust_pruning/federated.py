"""Part (c): does client-side pruning for compression act as a defense against text attacks?

``simulations/robust_pruning_federated.toml`` three times, from the MiniLM fine-tuned on SST-2
by ``robust_pruning.py`` (saved as a Hugging Face folder under ``~/.cache/fedleak``): clients
take one FedSGD step on 4 sentences (lr 0.03), then send

* ``dense``       — their state as is (``sgd`` trainer, ``fedavg`` server);
* ``randomized``  — 50 % of every encoder weight pruned by a randomized magnitude mask drawn
  from the client's generator (``sparse_prune``, ``sparse_fedavg`` server);
* ``krp``         — 50 % pruned by KRP with the client's 50 sentences as calibration.

The server widens the pooler (``hd`` 2,048) and runs LAMP and the pooler attack (50 steps
each) on one client's round-1 update.  Columns: the global model's SST-2 dev accuracy after the
round, the accuracy of the state the observed client sent, the attacks' ROUGE-1/2 (LAMP's
convention) and token accuracy, and attack seconds.  Each ``--seeds`` value is the
experiment's seed: other sampled clients, other batches, other masks.  Resumable per (variant,
seed) (the run directories under ``~/.cache/fedleak`` are not committed; the rows are).

    nice -n 5 .venv/bin/python simulations/benchmarks/robust_pruning/federated.py --seeds 0 1 2
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench  # first: keeps Flower offline
import torch
from robust_pruning import CACHE, Setup, build_parser

from fedleak import config, hf, pipeline

FIELDS = [
    "variant",
    "seed",
    "attack",
    "global_accuracy",
    "sent_accuracy",
    "sent_sparsity",
    "rouge1_lamp",
    "rouge2_lamp",
    "token_acc",
    "attack_seconds",
    *_bench.STAMP,
]
VARIANTS = {
    "dense": [],
    "randomized": [],
    "krp": ["training.method=krp"],
}
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def fine_tuned_folder(args) -> Path:
    """The fine-tuned MiniLM as a Hugging Face folder (what model.path reads)."""
    folder = CACHE / f"minilm_sst2_n{args.train}_e{args.epochs}"
    if not (folder / "config.json").is_file():
        setup = Setup(args)
        setup.dense.hf.save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if (hf.minilm_dir() / name).is_file():
                shutil.copy(hf.minilm_dir() / name, folder / name)
    return folder


def main() -> None:
    parser = build_parser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="experiment seeds")
    args = parser.parse_args(["oneshot", *sys.argv[1:]])
    torch.set_num_threads(1)
    runs = args.out / "federated_runs.csv"
    done = {(r["variant"], int(r["seed"])) for r in _bench.read_rows(runs)}
    folder = fine_tuned_folder(args)
    root = args.data or os.environ.get("FEDLEAK_DATA_ROOT") or "/work/shared/data"
    os.environ["FEDLEAK_DATA_ROOT"] = root  # LAMP's n-gram prior reads WikiText-2 there
    measured = _bench.commit()
    for seed, (variant, overrides) in ((s, v) for s in args.seeds for v in VARIANTS.items()):
        if (variant, seed) in done:
            continue
        options = [f"seed={seed}", f"data.root={root}", f"model.path={folder}", *overrides]
        exp = _load(variant, options)
        out = CACHE / "federated" / variant  # run directories (views: ~90 MB each) stay out of git
        if out.exists():
            shutil.rmtree(out)  # a half-finished run: start it again
        store = pipeline.run(exp, out)
        rows = store.rows("results.csv")
        utility = store.rows("utility.csv")
        view = next(iter(store.views(exp)))
        sent = exp.build_model()
        sent.load_state_dict(view.received)
        accuracy = _accuracy(sent, exp.dataset().test)
        weights = [v for k, v in view.received.items() if "encoder.layer" in k and "weight" in k]
        sparsity = float(
            sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        )
        for row in rows:
            out_row = {
                "variant": variant,
                "seed": seed,
                "attack": row["attack"],
                "global_accuracy": 100 * float(utility[-1]["test_accuracy"]),
                "sent_accuracy": accuracy,
                "sent_sparsity": 100 * sparsity,
                "rouge1_lamp": 100 * float(row["rouge1_lamp"]),
                "rouge2_lamp": 100 * float(row["rouge2_lamp"]),
                "token_acc": 100 * float(row["token_acc"]),
                "attack_seconds": float(row["seconds"]),
            }
            _bench.append_row(runs, _bench.stamp(out_row, measured), FIELDS)
            print(out_row, flush=True)


def _load(variant: str, overrides: list[str]):
    """The experiment of ``variant``; dense: the same file with the sgd trainer and FedAvg."""
    path = _bench.REPO / "simulations/robust_pruning_federated.toml"
    if variant != "dense":
        return config.load(path, overrides)
    raw = _bench.load_config(path)
    raw["training"] = {k: raw["training"][k] for k in ("lr", "local_steps", "batch_size")}
    raw["training"]["name"] = "sgd"
    raw["server"] = {"name": "fedavg"}
    return config.load(raw, overrides)


@torch.no_grad()
def _accuracy(model, batch) -> float:
    model.eval()
    preds = torch.cat([model(batch.inputs[s : s + 64]).argmax(1) for s in range(0, len(batch), 64)])
    return 100 * float((preds == batch.labels).float().mean())


if __name__ == "__main__":
    main()
