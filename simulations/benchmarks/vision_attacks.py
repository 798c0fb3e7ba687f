"""Vision gradient-inversion attacks on CIFAR-10 images, every attack at one iteration budget.

For each model state (the ConvNet untrained, and trained for one epoch), batch size B and attack,
``batches`` batches of CIFAR-10 test images (batch k of size B = images kB .. kB+B-1 of the
selection) are each sent through one FedSGD step (``ServerView.from_local_step``), attacked, and
scored after Hungarian matching: PSNR, SSIM, label accuracy, feature cosine (feature attacks),
LPIPS (only where its backbone's weights are on the machine: otherwise "not computed"), seconds
and iterations per second.  Attacks that need a malicious server (the feature attack's Gaussian
head, Robbing the Fed's imprint block) get their modifier applied to the model first.

Outputs, written as rows finish (a rerun skips finished (attack, state, B, batch) rows, so an
interrupted run resumes):

* ``vision_attacks_runs.csv``  one row per attacked batch;
* ``vision_attacks.csv``       one row per (attack, state, B): mean and max PSNR, SSIM, ...;
* ``vision_attacks.md``        that table, the machine, the settings and the caveats;
* ``vision_attacks_grid.png``  truths and each attack's matched reconstructions of one batch;
* ``checkpoints/``             the trained ConvNet, reused by later runs with the same settings.

    .venv/bin/python simulations/benchmarks/vision_attacks.py            # the full benchmark
    .venv/bin/python simulations/benchmarks/vision_attacks.py --quick    # ~1-2 min, for CI
    .venv/bin/python simulations/benchmarks/vision_attacks.py --steps 500 --batch-sizes 1 2 \\
        --attacks inverting_gradients feature_reconstruction --out /tmp/va --data-root DIR

Settings come from ``vision_attacks.toml`` (``--config``; a config may extend another with
``base`` and name the ``rows`` to run, as ``vision_ablation.toml`` does); options given here
override it.  ``--report`` only rewrites the tables from the rows in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import _bench  # first: keeps Flower offline (imported by nothing here, but harmless)
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from torch import nn

from fedleak import metrics, results, seeding
from fedleak.attacks import ATTACKS
from fedleak.core import Batch, Reconstruction, ServerView
from fedleak.data import _sources, cifar10
from fedleak.metrics.image import lpips_available, match
from fedleak.models import MODELS
from fedleak.modifiers import MODIFIERS
from fedleak.training import TRAINERS

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "vision_attacks.toml"
TASK = cifar10.CIFAR10.task
RUNS = "vision_attacks_runs.csv"
SUMMARY = "vision_attacks.csv"
PAGE = "vision_attacks.md"
GRID = "vision_attacks_grid.png"
RUN_FIELDS = [
    "attack",
    "state",
    "B",
    "batch",
    "images",
    "status",
    "psnr",
    "psnr_max",
    "ssim",
    "ssim_max",
    "label_acc",
    "feature_cos",
    "lpips",
    "seconds",
    "iterations",
    "it_per_s",
    *_bench.STAMP,
]
SUMMARY_FIELDS = [
    "attack",
    "state",
    "B",
    "batches",
    "psnr_mean",
    "psnr_max",
    "ssim_mean",
    "ssim_max",
    "label_acc",
    "feature_cos",
    "lpips",
    "seconds",
    "it_per_s",
]
# The client step's batch norm (fedleak.core.set_batch_norm), as the page states it.
BATCH_NORM = {
    "train": "train mode: the batch's own statistics, which the server does not know",
    "eval": "eval mode: the public running statistics the server sent (breaching's "
    "provide_public_buffers, the literature's B = 1 setting)",
}
QUICK = {
    "batch_sizes": [1, 2],
    "batches": 1,
    "steps": 4,
    "grid_batch_size": 2,
    "model": {"width": 8},
    "training": {"limit": 128},
}


# -- settings -------------------------------------------------------------------------------
SETTABLE = ("images", "indices", "batch_sizes", "batches", "steps", "states", "seed")


def settings(
    config: Path,
    *,
    quick: bool = False,
    width: int | None = None,
    attacks: list[str] | None = None,
    data_root: str | None = None,
    **values,
) -> dict:
    """The TOML file, then ``quick``, then explicit values (None: keep): the resolved settings.

    ``values`` are top-level settings by name (:data:`SETTABLE`); ``attacks`` the config's
    [attacks] rows to run (default: all).
    """
    if unknown := sorted(set(values) - set(SETTABLE)):
        raise TypeError(f"settings: unknown {unknown}; settable: {', '.join(SETTABLE)}")
    cfg = _bench.load_config(config)
    if quick:
        cfg = _bench.merge_config(cfg, QUICK)
    cfg.update({k: v for k, v in values.items() if v is not None})
    if width is not None:
        cfg["model"]["width"] = width
    rows = attacks or cfg.pop("rows", None)  # the [attacks] rows to run (default: all)
    if rows:
        unknown = [a for a in rows if a not in cfg["attacks"]]
        if unknown:
            raise SystemExit(
                f"vision_attacks: attack rows {unknown} not in {config}; "
                f"it defines {', '.join(cfg['attacks'])}"
            )
        cfg["attacks"] = {k: cfg["attacks"][k] for k in rows}
    root = Path(data_root or cfg["data_root"]).expanduser()
    cfg["data_root"] = str(root if root.is_absolute() else (_bench.REPO / root).resolve())
    if cfg["batches"] < 1 or cfg["steps"] < 1 or not cfg["batch_sizes"]:
        raise SystemExit("vision_attacks: need batches >= 1, steps >= 1 and some batch sizes")
    cfg.setdefault("batch_norm", "train")
    if cfg["batch_norm"] not in BATCH_NORM:
        raise SystemExit(
            f"vision_attacks: batch_norm {cfg['batch_norm']!r} unknown; use one of "
            f"{', '.join(BATCH_NORM)}"
        )
    bad = [s for s in cfg["states"] if s not in ("untrained", "trained")]
    if bad:
        raise SystemExit(f"vision_attacks: states {bad} unknown; use untrained and/or trained")
    return cfg


# -- data and models ------------------------------------------------------------------------
def load_images(cfg: dict) -> tuple[Batch, Batch | None, str]:
    """(test images to attack, in selection order; a training split or None; a description)."""
    root = Path(cfg["data_root"])
    if not root.is_dir():
        raise SystemExit(
            f"vision_attacks: data root {root} does not exist; pass --data-root DIR with "
            "cifar10*.npz files or cifar-10-batches-py/ (e.g. ../shared/data beside the repo)"
        )
    train, test = cifar10.read(root)
    if test is None:
        raise SystemExit(
            f"vision_attacks: no CIFAR-10 test images in {root}; it needs a cifar10*test*.npz "
            "file or cifar-10-batches-py/test_batch"
        )
    needed = max(cfg["batch_sizes"]) * cfg["batches"]
    if cfg["indices"]:
        chosen = np.asarray(cfg["indices"], dtype=np.int64)
    else:
        chosen = np.arange(cfg["images"] or needed)
    if len(chosen) < needed or chosen.max(initial=0) >= len(test[1]):
        raise SystemExit(
            f"vision_attacks: {batches_text(cfg)} need {needed} images; the selection has "
            f"{len(chosen)} (indices must be < {len(test[1])}, the test images in {root})"
        )
    test_batch = _sources.to_batch(test, TASK)
    attacked = Batch(test_batch.inputs[chosen], test_batch.labels[chosen])
    if train is not None:
        return attacked, _sources.to_batch(train, TASK), f"the training split in {root}"
    # The whole selection, not just the images this run's cells need: a run of some batch sizes
    # must attack the same trained model as a run of the others.
    used = set(chosen.tolist())
    rest = np.array([i for i in range(len(test[1])) if i not in used], dtype=np.int64)
    pool = Batch(test_batch.inputs[rest], test_batch.labels[rest])
    return attacked, pool, f"the {len(rest)} test images in {root} outside the selection"


def batches_text(cfg: dict) -> str:
    return f"{cfg['batches']} batches of up to {max(cfg['batch_sizes'])}"


def untrained(cfg: dict) -> nn.Module:
    spec = {k: v for k, v in cfg["model"].items() if k != "name"}
    with seeding.isolated(cfg["seed"], "vision_attacks", "model"):
        return MODELS[cfg["model"]["name"]](**spec)(TASK)


def base_models(cfg: dict, pool: Batch | None, out: Path) -> dict[str, nn.Module]:
    """The models to attack, by state; the trained one is cached under ``out/checkpoints``."""
    models = {}
    for state in cfg["states"]:
        model = untrained(cfg)
        if state == "trained":
            model.load_state_dict(trained_state(cfg, pool, out))
        models[state] = model  # the view sets the client step's modes (batch_norm)
    return models


def trained_state(cfg: dict, pool: Batch | None, out: Path) -> dict:
    training = dict(cfg["training"])
    limit = training.pop("limit", 0)
    if pool is None:
        raise SystemExit("vision_attacks: no images left to train the 'trained' state on")
    if limit:
        pool = Batch(pool.inputs[:limit], pool.labels[:limit])
    key = json.dumps([cfg["model"], training, cfg["seed"], len(pool)], sort_keys=True)
    digest = hashlib.sha256(key.encode() + pool.labels.numpy().tobytes()).hexdigest()[:12]
    path = out / "checkpoints" / f"{cfg['model']['name']}-{digest}.pt"
    if path.is_file():
        return torch.load(path)
    model = untrained(cfg)
    trainer = TRAINERS["sgd"](
        lr=training["lr"],
        local_epochs=training["epochs"],
        batch_size=training["batch_size"],
        momentum=training["momentum"],
    )
    start = time.perf_counter()
    trainer.fit(model, pool, nn.functional.cross_entropy, seeding.rng(cfg["seed"], "train"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"trained {path.name} on {len(pool)} images in {time.perf_counter() - start:.0f} s")
    return model.state_dict()


def server_view(
    base: nn.Module, spec: dict, batch: Batch, rng: torch.Generator, batch_norm: str
) -> ServerView:
    """The view of one FedSGD step on ``batch``, after the attack's modifier (if any)."""
    model = copy.deepcopy(base)
    secrets = {}
    if "modifier" in spec:
        modifier = MODIFIERS.build(spec["modifier"])
        model = modifier.architecture(model)
        params, secrets = modifier(dict(model.state_dict()), 1, rng)
        model.load_state_dict(params)
    view = ServerView.from_local_step(model, batch, TASK, batch_norm=batch_norm)
    return dataclasses.replace(view, secrets=secrets)


# -- running --------------------------------------------------------------------------------
def cells(cfg: dict) -> Iterable[tuple[str, str, int, int]]:
    for state in cfg["states"]:
        for size in cfg["batch_sizes"]:
            for name in cfg["attacks"]:
                for k in range(cfg["batches"]):
                    yield name, state, size, k


def _analytic(spec: dict) -> bool:
    """Whether the attack has no iteration budget (closed form, like imprint)."""
    return all(f.name != "steps" for f in dataclasses.fields(ATTACKS[spec["name"]]))


def attack_of(spec: dict, steps: int):
    options = {k: v for k, v in spec.items() if k != "modifier"}
    if not _analytic(spec):
        options["steps"] = steps
    return ATTACKS.build(options)


def run_one(cfg, name, state, size, k, base, images, out, device="cpu") -> dict:
    spec = cfg["attacks"][name]
    picked = list(range(k * size, (k + 1) * size))
    batch = Batch(images.inputs[picked], images.labels[picked])
    seed = cfg["seed"]
    rng = seeding.rng(seed, "modifier", name, state, size, k)
    view = server_view(base, spec, batch, rng, cfg["batch_norm"])
    attack = attack_of(spec, cfg["steps"])
    start = time.perf_counter()
    rng = seeding.rng(seed, "attack", name, state, size, k)
    reconstruction = attack(view.to(device), rng).to("cpu")  # on the device, scored on the CPU
    seconds = time.perf_counter() - start
    result = metrics.score(reconstruction, batch, TASK, view=view)
    iterations = float(reconstruction.info.get("steps", 0.0)) if hasattr(attack, "steps") else 0
    if k == 0:  # kept for the grid
        folder = out / "reconstructions"
        folder.mkdir(exist_ok=True)
        torch.save(
            {"inputs": reconstruction.inputs.detach(), "truth": batch.inputs},
            folder / f"{name}-{state}-{size}.pt",
        )
    return {
        "attack": name,
        "state": state,
        "B": size,
        "batch": k,
        "images": " ".join(str(i) for i in picked),
        "status": "ok",
        **{f: result.get(f, math.nan) for f in RUN_FIELDS[6:13]},
        "seconds": seconds,
        "iterations": iterations,
        "it_per_s": iterations / seconds if iterations else math.nan,
    }


# -- tables ---------------------------------------------------------------------------------
def summarise(rows: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    """One row per (attack, state, B) with finished batches, in the settings' order; means and
    maxima skip NaN (a metric that does not apply)."""
    cells = (
        rows[rows["status"] == "ok"]
        .groupby(["attack", "state", "B"])
        .agg(
            batches=("psnr", "size"),
            psnr_mean=("psnr", results.mean),
            psnr_max=("psnr_max", "max"),
            ssim_mean=("ssim", results.mean),
            ssim_max=("ssim_max", "max"),
            **{f: (f, results.mean) for f in ("label_acc", "feature_cos", "lpips", "seconds")},
            it_per_s=("it_per_s", results.mean),
        )
    )
    order = [(a, s, b) for s in cfg["states"] for b in cfg["batch_sizes"] for a in cfg["attacks"]]
    return cells.loc[[k for k in order if k in cells.index]].reset_index()


def write_tables(out: Path, cfg: dict, rows: pd.DataFrame, facts: dict) -> str:
    summary = summarise(rows, cfg)
    page = markdown(cfg, summary, rows, {**facts, "provenance": _bench.provenance(rows)})
    return _bench.write_summary(out / SUMMARY, summary, SUMMARY_FIELDS, out / PAGE, page)


def markdown(cfg: dict, summary: pd.DataFrame, rows: pd.DataFrame, facts: dict) -> str:
    lpips_note = (
        "LPIPS (AlexNet) computed."
        if lpips_available()
        else "LPIPS: **not computed** (the `lpips` package and torchvision's ImageNet AlexNet "
        "weights are not on this machine, and fedleak does not download them)."
    )
    attacks = "; ".join(
        f"`{k}` = {json.dumps(v if _analytic(v) else {**v, 'steps': cfg['steps']})}"
        for k, v in cfg["attacks"].items()
    )
    lines = [
        "# Vision attacks on CIFAR-10",
        "",
        f"Machine: {os.cpu_count()} cores (load average {facts['load']} at the start of the "
        f"last run, {_bench.load_average()} now), torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads); {facts['provenance']}.",
        "",
        "Threat model: an honest-but-curious server (malicious where a row has a modifier) "
        "that knows the architecture and the weights it sent attacks one FedSGD step; the "
        f"client's batch norm runs in {BATCH_NORM[cfg['batch_norm']]}.",
        "",
        f"Data: {facts['images']}; model: {cfg['model']} (untrained, and trained "
        f"{cfg['training']['epochs']} epoch(s) of SGD on {facts['pool']}); one FedSGD step "
        f"per batch; batch k of size B = selected images kB..kB+B-1; column `batches`: the "
        f"batches run per cell (resumed runs may add more); budget {cfg['steps']} iterations "
        f"per optimisation attack. Attacks: {attacks}.",
        "",
        "PSNR and SSIM (scikit-image's windowed SSIM, not breaching's CW-SSIM) after Hungarian "
        "matching on pixel MSE: `psnr mean` averages the batches' mean PSNR, `psnr max` is the "
        "best single image of the cell. `feature cos`: mean |cos| between recovered and true "
        "features (feature attacks only). Seconds and it/s per batch (optimisation attacks: "
        "iterations = gradient-matching evaluations). Rows under a modifier are a malicious "
        f"server's. {lpips_note}",
        "",
        "| attack | state | B | batches | psnr mean | psnr max | ssim mean | ssim max | "
        "label acc | feature cos | lpips | seconds | it/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.to_dict("records"):
        lpips = "not computed" if math.isnan(r["lpips"]) else f"{r['lpips']:.3f}"
        lines.append(
            f"| {r['attack']} | {r['state']} | {r['B']} | {r['batches']} | {r['psnr_mean']:.2f} "
            f"| {r['psnr_max']:.2f} | {r['ssim_mean']:.3f} | {r['ssim_max']:.3f} "
            f"| {_bench.cell(r['label_acc'], 2)} | {_bench.cell(r['feature_cos'], 3)} | {lpips} "
            f"| {r['seconds']:.1f} | {_bench.cell(r['it_per_s'], 2)} |"
        )
    lines += ["", *verdict(summary, rows, cfg, facts.get("reference_psnr", {}))]
    if missing := not_run(summary, cfg):
        lines += ["", f"Cells of the settings without rows (not run): {missing}."]
    lines += ["", facts["reference"], ""]
    lines += [f"breaching side by side: {facts['breaching']}", ""]
    return "\n".join(lines)


def not_run(summary: pd.DataFrame, cfg: dict) -> str:
    """The settings' (attack, state) pairs and the batch sizes they have no rows at."""
    have = set(zip(summary["attack"], summary["state"], summary["B"], strict=True))
    parts = []
    for state in cfg["states"]:
        for name in cfg["attacks"]:
            sizes = [str(b) for b in cfg["batch_sizes"] if (name, state, b) not in have]
            if sizes:
                parts.append(f"{name} ({state}) at B = {', '.join(sizes)}")
    return "; ".join(parts)


def verdict(
    summary: pd.DataFrame, rows: pd.DataFrame, cfg: dict, reference: dict[int, float]
) -> list[str]:
    """The config's ``[targets]`` (a target of 0 is not checked), on the untrained ConvNet:

    * ``best_b1``: the best honest optimisation attack's mean PSNR at B = 1;
    * ``ig_b1``: Inverting Gradients' mean PSNR at B = 1;
    * ``ig_over_reference``: Inverting Gradients above the no-attack mean-colour PSNR
      (``reference``, by B) at every B;
    * ``feature_over_ig``: the feature attacks above Inverting Gradients at every B >= 2.

    Cells with fewer batches than the settings ask for are marked partial.  Each difference
    between attacks carries the standard error of the per-batch paired difference (the same
    images attacked both ways)."""
    targets = cfg.get("targets", {})
    cells = {(r["attack"], r["state"], r["B"]): r for r in summary.to_dict("records")}
    psnr = rows.set_index(["state", "B", "batch", "attack"])["psnr"].unstack("attack")

    def se(name: str, state: str, size: int) -> str:
        # over the batches both attacks ran (a partial cell is paired on its own batches)
        diffs = (psnr[name] - psnr["inverting_gradients"]).loc[(state, size)].dropna()
        error = diffs.sem()
        return "" if math.isnan(error) else f" ± {error:.2f}"

    def partial(*rows: dict) -> str:
        return " (partial)" if any(r["batches"] < cfg["batches"] for r in rows) else ""

    lines = []
    if best := targets.get("best_b1"):
        honest = [
            cells[key]
            for key in ((a, "untrained", 1) for a, spec in cfg["attacks"].items()
                        if not _analytic(spec) and "modifier" not in spec)
            if key in cells
        ]  # fmt: skip
        if honest:
            top = max(honest, key=lambda r: r["psnr_mean"])
            lines.append(
                f"- best honest optimisation attack at B = 1, untrained: {top['attack']} "
                f"{top['psnr_mean']:.2f} dB mean PSNR (target >= {best} dB: "
                f"{top['psnr_mean'] - best:+.2f}){partial(top)}."
            )
    ig = cells.get(("inverting_gradients", "untrained", 1))
    if ig and (target := targets.get("ig_b1")):
        lines.append(
            f"- inverting_gradients at B = 1, untrained: {ig['psnr_mean']:.2f} dB mean PSNR "
            f"(target >= {target} dB: {ig['psnr_mean'] - target:+.2f}){partial(ig)}."
        )
    if margin := targets.get("ig_over_reference"):
        gaps = [
            f"B = {b}: {cell['psnr_mean'] - reference[b]:+.2f}{partial(cell)}"
            for b in cfg["batch_sizes"]
            if (cell := cells.get(("inverting_gradients", "untrained", b))) and b in reference
        ]
        if gaps:
            lines.append(
                f"- inverting_gradients - mean colour, mean PSNR, untrained: {', '.join(gaps)} dB "
                f"(target: >= +{margin} dB)."
            )
    target = targets.get("feature_over_ig")
    for name in ("feature_reconstruction", "feature_reconstruction_honest") if target else ():
        for state in cfg["states"]:
            gaps = []
            for b in (b for b in cfg["batch_sizes"] if b >= 2):
                ours = cells.get((name, state, b))
                base = cells.get(("inverting_gradients", state, b))
                if ours and base:
                    gap = ours["psnr_mean"] - base["psnr_mean"]
                    gaps.append(f"B = {b}: {gap:+.2f}{se(name, state, b)}{partial(ours, base)}")
            if gaps:
                lines.append(
                    f"- {name} - inverting_gradients, mean PSNR, {state}: {', '.join(gaps)} dB "
                    f"(target: >= +{target} dB at every B >= 2)."
                )
    if any(" ± " in line for line in lines):
        lines.append(
            "(± the standard error of the per-batch paired difference: the same images attacked "
            "both ways.)"
        )
    return lines


def no_attack_scores(cfg: dict, images: Batch) -> dict[int, pd.Series]:
    """What an attack that reads nothing scores, by B: the mean PSNR of the dataset-mean colour
    as every image, over each cell's first ``batches`` batches."""
    scores = {}
    for size in cfg["batch_sizes"]:
        cell = []
        for k in range(cfg["batches"]):
            picked = slice(k * size, (k + 1) * size)
            batch = Batch(images.inputs[picked], images.labels[picked])
            # model input 0 is the normalisation mean: the mean colour of the data set
            guess = Reconstruction(inputs=torch.zeros_like(batch.inputs), labels=batch.labels)
            cell.append(metrics.score(guess, batch, TASK))
        scores[size] = pd.DataFrame(cell).agg(results.mean)  # over the batches
    return scores


def reference(cfg: dict, scores: dict[int, pd.Series]) -> str:
    """The page's sentence on the no-attack reference (:func:`no_attack_scores`)."""
    psnr = " / ".join(f"{scores[b]['psnr']:.2f}" for b in cfg["batch_sizes"])
    ssim = " / ".join(f"{scores[b]['ssim']:.3f}" for b in cfg["batch_sizes"])
    sizes = " / ".join(str(b) for b in cfg["batch_sizes"])
    return (
        f"Reference, no attack: the data set's mean colour as every reconstruction scores PSNR "
        f"{psnr} and SSIM {ssim} at B = {sizes}, over each cell's first "
        f"{cfg['batches']} batches (the table's cells may hold fewer); a mean PSNR at or below it "
        "says the attack recovered nothing beyond the mean colour."
    )


def grid(out: Path, cfg: dict) -> Path | None:
    """Truths, then each attack's matched reconstructions of batch 0, per model state."""
    size = cfg["grid_batch_size"]
    if size not in cfg["batch_sizes"]:
        size = max(cfg["batch_sizes"])
    bands, labels = [], []
    for state in cfg["states"]:
        saved = {
            name: out / "reconstructions" / f"{name}-{state}-{size}.pt" for name in cfg["attacks"]
        }
        saved = {k: torch.load(v) for k, v in saved.items() if v.is_file()}
        if not saved:
            continue
        truth = TASK.to_pixels(next(iter(saved.values()))["truth"])
        rows = [truth]
        labels += [f"truth ({state}, B={size})", *saved]
        for entry in saved.values():
            rec = TASK.to_pixels(entry["inputs"].float())
            rec_idx, true_idx = match(rec, truth)
            ordered = torch.ones_like(truth)
            ordered[torch.as_tensor(true_idx)] = rec[torch.as_tensor(rec_idx)]
            rows.append(ordered)
        bands.append(torch.stack(rows))  # [rows, B, C, H, W]
    if not bands:
        return None
    tiles = torch.cat(bands)  # every band has the same B
    scale, gap, margin = 3, 2, 170  # tiles upscaled 3x; a left margin for the row labels
    n_rows, n_cols, _, h, w = tiles.shape
    canvas = np.full(
        (n_rows * (h * scale + gap), margin + n_cols * (w * scale + gap), 3), 255, dtype=np.uint8
    )
    for i in range(n_rows):
        for j in range(n_cols):
            tile = (tiles[i, j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = tile.repeat(scale, 0).repeat(scale, 1)
            y, x = i * (h * scale + gap), margin + j * (w * scale + gap)
            canvas[y : y + h * scale, x : x + w * scale] = tile
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i, label in enumerate(labels):
        draw.text((4, i * (h * scale + gap) + h * scale // 2 - 5), label, fill=(0, 0, 0))
    path = out / GRID
    picture.save(path)
    return path


def breaching_row() -> str:
    """Whether breaching's Inverting Gradients can run here, side by side."""
    try:
        import breaching  # noqa: F401 - optional, not a fedleak dependency
    except Exception as err:  # ImportError, or torchvision's ops failing to load (RuntimeError)
        return (
            f"not available (`import breaching`: {type(err).__name__}: {err}). breaching 0.1.2 "
            "installs from PyPI, but it imports torchvision, and PyPI's torchvision is built "
            "for PyPI's CUDA torch: against this CPU build its operators do not load "
            "(`operator torchvision::nms does not exist`), and the matching CPU wheel is only "
            "on the PyTorch index, which this machine cannot reach."
        )
    return "breaching imports here, but its side-by-side row is not implemented yet."


def key(row: dict) -> tuple:
    """What a runs row measured: (attack, state, B, batch), as :func:`cells` lists them."""
    return row["attack"], row["state"], int(row["B"]), int(row["batch"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--quick", action="store_true", help="B = 1, 2; 1 batch; 4 steps")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--data-root", help="folder with the CIFAR-10 files (default: config)")
    parser.add_argument("--images", type=int, help="select the first N test images")
    parser.add_argument("--indices", type=int, nargs="+", help="or exactly these test images")
    parser.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+")
    parser.add_argument("--batches", type=int, help="batches per (attack, state, B)")
    parser.add_argument("--steps", type=int, help="iteration budget of every attack")
    parser.add_argument("--states", nargs="+", help="untrained and/or trained")
    parser.add_argument("--attacks", nargs="+", help="row labels from the config's [attacks]")
    parser.add_argument("--width", type=int, help="ConvNet width")
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
    cfg = settings(
        args.config,
        quick=args.quick,
        width=args.width,
        attacks=args.attacks,
        data_root=args.data_root,
        **{k: getattr(args, k) for k in SETTABLE},
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    images, pool, pool_text = load_images(cfg)
    chosen = cfg["indices"] or f"the first {len(images)}"
    scores = no_attack_scores(cfg, images)
    facts = {
        "load": _bench.load_average(),
        "commit": _bench.commit(),
        "images": f"CIFAR-10 test images ({chosen}) from {cfg['data_root']}",
        "pool": pool_text,
        "breaching": breaching_row(),
        "reference": reference(cfg, scores),
        "reference_psnr": {b: float(v["psnr"]) for b, v in scores.items()},
    }
    runs = out / RUNS
    if args.merge:
        added = _bench.merge_rows(runs, args.merge, key, RUN_FIELDS)
        print(f"merged {added} rows into {runs}", flush=True)
    if args.report or args.merge:
        rows = _bench.read_runs(runs, RUN_FIELDS)
        _bench.check_budget(rows["iterations"], cfg["steps"], runs)
        print(write_tables(out, cfg, rows, facts))
        grid(out, cfg)
        return
    models = base_models(cfg, pool, out)
    done = {key(r) for r in _bench.read_rows(runs)}
    todo = [c for c in cells(cfg) if c not in done]
    print(f"{len(done)} rows already in {runs}; {len(todo)} to run", flush=True)
    for name, state, size, k in todo:
        row = _bench.stamp(
            run_one(cfg, name, state, size, k, models[state], images, out, args.device),
            facts["commit"],
            args.device,
        )
        _bench.append_row(runs, row, RUN_FIELDS)
        print(
            f"{name} {state} B={size} batch {k}: psnr {row['psnr']:.2f} ssim {row['ssim']:.3f} "
            f"labels {row['label_acc']:.2f} {row['seconds']:.1f} s",
            flush=True,
        )
        write_tables(out, cfg, _bench.read_runs(runs, RUN_FIELDS), facts)
    page = write_tables(out, cfg, _bench.read_runs(runs, RUN_FIELDS), facts)
    grid(out, cfg)
    print(page)


if __name__ == "__main__":
    sys.exit(main())
