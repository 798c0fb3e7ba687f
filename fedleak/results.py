"""Results as pandas DataFrames, and the one description of the CSV files fedleak writes.

Every analysis of results (``fedleak report``, the summary ``fedleak run`` prints, the sweep's
bookkeeping, the benchmark scripts, the notebooks) reads CSV files through :func:`read`, so
they are parsed one way: text columns stay text (a strength ``1e-05`` or a commit ``1234567`` is
not a number), an empty cell or ``nan`` is NaN.  Writing stays
with :class:`fedleak.store.RunStore`, which appends each row as it is produced so that a run
that dies keeps what it finished.

Units throughout: accuracies are fractions in [0, 1], PSNR is in dB, SSIM and cosines are
in [-1, 1], seconds are wall time; NaN (an empty cell) means the metric does not apply, e.g.
the label accuracy of an attack that recovers no labels.

``utility.csv`` (a run): one row per evaluated round, round 0 being the initial model.

    ====================  ========================================================================
    round                 the round after which the global model was evaluated
    test_loss             mean loss of the global model on the test set
    test_accuracy         fraction of the test set it classifies correctly
    worst_group_accuracy  the lowest accuracy over the test set's groups (data with group ids only,
                          e.g. waterbirds_lite; the column is absent otherwise)
    train_loss            mean training loss the round's clients reported (NaN in round 0)
    clients               clients sampled in the round
    failures              sampled clients whose update was not finite (left out of the average)
    seconds               since the server started
    ====================  ========================================================================

``results.csv`` (a run): one row per (round, client, attack), appended as attacks finish.

    ==============  ===========================================================================
    round, client   the observed update (client -1: a securely aggregated round)
    attack_index    the attack's position in the experiment's ``[[attacks]]`` (0-based)
    attack          its registered name
    examples        examples the client trained on
    *scores*        :func:`fedleak.metrics.score` for the task's modality, after matching
                    reconstructions to truths.  Images: ``mse``, ``psnr``, ``ssim`` (means over
                    matched pairs), ``psnr_max``, ``ssim_max`` (the best pair), ``lpips`` (NaN
                    without its weights), ``label_acc`` (order-free), ``label_acc_matched``.
                    Text: ``rouge1``, ``rouge2``, ``rougeL``, their LAMP-compatible
                    ``*_lamp``, ``token_acc``, ``exact``, ``token_overlap``, ``label_acc``,
                    ``label_acc_matched``.  Both: ``feature_cos`` (feature attacks only).
                    Rounded to 6 decimals.
    seconds         the attack's wall time
    ==============  ===========================================================================

``bound.csv`` (a sweep cell with a noise defense): Paper B's bound, one row per observed view.

    ================  =========================================================================
    round, client     the view
    mse_lower_bound   lower bound on any attack's per-pixel MSE (NaN when it does not apply)
    fisher_per_pixel  the update's Fisher information per pixel
    prior_var         the prior's per-pixel variance (the bound's ceiling)
    reason            why the bound does not apply (empty when it does)
    ================  =========================================================================

``results.csv`` (a sweep, ``fedleak bench``): one row per cell x attack, written when the cell
is finished; ``cells/<cell>/`` holds each cell's run directory.

    ==================  =======================================================================
    cell                the cell id, ``<label>-<strength>-s<seed>`` (``none-s<seed>``)
    defense             the axis label (``none``: the undefended reference)
    parameter           the defense option the axis varies (empty for the reference)
    strength            its value as text, as the sweep file writes it (empty: the reference)
    seed                the cell's seed
    attack_index        the attack's position in the base experiment's ``[[attacks]]``
    attack              its registered name
    views               observed updates it attacked
    test_accuracy       the global model's after the last round
    reference_accuracy  the undefended cell's of the same seed
    accuracy_drop       reference_accuracy - test_accuracy (a fraction, not points)
    mse, psnr, ssim,    the attack's means over its views (NaN skipped); rounded to 6 decimals
    label_acc
    mse_lower_bound     Paper B's bound, the mean of the cell's ``bound.csv`` (noise defenses)
    max_psnr, max_ssim, the cell's strongest attack: the maximum over its attacks of each mean
    max_label_acc       (NaN never wins)
    strongest_attack    the attack with the highest mean PSNR
    epsilon             DP-SGD's epsilon over the run (empty without DP-SGD)
    cell_seconds        the cell's wall time
    ==================  =======================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedleak.registry import ConfigError
from fedleak.store import RunStore

# Columns that are text whatever they hold: parsed as numbers, a strength "1e-05" would become
# 1e-05 (no longer the sweep's spelling) and an all-digit commit an integer.  The benchmark
# scripts' runs files share the reader, so their text columns are listed too.
TEXT = frozenset(
    {
        "cell",
        "defense",
        "parameter",
        "strength",
        "attack",
        "strongest_attack",
        "reason",
        # simulations/benchmarks/*_runs.csv
        "dataset",
        "state",
        "images",
        "status",
        "commit",
        "finished",
        "device",
    }
)
# How to make each file that a missing path names, for the error.
_FIX = {
    "utility.csv": "the federation has not evaluated a round yet; run `fedleak run CONFIG`",
    "results.csv": "no attack has finished yet; run `fedleak attack RUN_DIR`, or for a sweep "
    "`fedleak bench SWEEP.toml --out DIR`",
}


@dataclass(frozen=True)
class Results:
    """A run's or a sweep's results.

    A run: ``results`` and ``utility`` are its two CSV files, ``meta`` its meta.json as one
    row.  A sweep: ``results`` is its results.csv (one row per cell x attack), ``utility``
    every cell's utility.csv with a ``cell`` column first, and ``meta`` one row per cell,
    indexed by cell id; both are empty when the cells' run directories are not kept (as in the
    committed sweeps).
    """

    results: pd.DataFrame
    utility: pd.DataFrame
    meta: pd.DataFrame


def read(path: str | Path) -> pd.DataFrame:
    """One CSV file that fedleak wrote, typed as the module docstring says.

    Raises:
        ConfigError: when ``path`` is not a file, naming how it gets made.
    """
    path = Path(path)
    if not path.is_file():
        fix = _FIX.get(path.name, "check the path")
        raise ConfigError(f"No {path.name} at {path}: {fix}.")
    header = pd.read_csv(path, nrows=0).columns
    frame = pd.read_csv(
        path,
        dtype={c: str for c in header if c in TEXT},
        keep_default_na=False,  # only an empty cell and "nan" (what csv writes for NaN) are NaN
        na_values=["", "nan"],
    )
    text = [c for c in frame.columns if c in TEXT]
    frame[text] = frame[text].fillna("")  # an empty text cell is text ("" strength: reference)
    return frame


def load(directory: str | Path) -> Results:
    """A run directory (``fedleak run``) or a sweep directory (``fedleak bench``).

    Raises:
        ConfigError: when ``directory`` is neither, or lacks its results.csv or (a run)
            its utility.csv.
    """
    root = Path(directory)
    if (root / "sweep.toml").is_file():
        cells = sorted(p for p in (root / "cells").glob("*") if (p / "meta.json").is_file())
        frames = [
            read(p / "utility.csv").assign(cell=p.name)
            for p in cells
            if (p / "utility.csv").is_file()  # not a cell that failed before its first round
        ]
        utility = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["cell"])
        return Results(
            results=read(root / "results.csv"),
            utility=utility.set_index("cell").reset_index(),  # the cell column first
            meta=pd.DataFrame(
                [_meta(p) for p in cells], index=pd.Index([p.name for p in cells], name="cell")
            ),
        )
    if (root / "config.toml").is_file():
        return Results(
            results=read(root / "results.csv"),
            utility=read(root / "utility.csv"),
            meta=pd.DataFrame([_meta(root)]),
        )
    raise ConfigError(
        f"{root} is neither a run directory (config.toml, from `fedleak run`) nor a sweep "
        "directory (sweep.toml, from `fedleak bench`); pass one of those."
    )


def mean(values: pd.Series) -> float:
    """The mean of the non-NaN values (NaN when there are none), summed exactly.

    The one mean of every fedleak table, for ``groupby(...).agg(mean)``: NaN is a metric that
    does not apply (an attack that recovers no labels has no label accuracy, not a zero), and
    the exact sum (``math.fsum``, as ``statistics.fmean``) makes the mean independent of the
    order and grouping of the rows, so a table regenerates digit for digit; pandas' own
    compensated sums differ in the last bit, enough to flip a sixth significant digit.
    """
    finite = values.dropna()
    return math.fsum(finite) / len(finite) if len(finite) else math.nan


def spread(values: pd.Series) -> float:
    """The sample standard deviation of the non-NaN values (NaN for fewer than two).

    The spread over seeds beside every :func:`mean` of a table; exact sums, like the mean.
    """
    finite = values.dropna()
    if len(finite) < 2:
        return math.nan
    centre = mean(finite)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in finite) / (len(finite) - 1))


def summary(results: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Per attack (in order of first appearance): ``views`` and the :func:`mean` of each column."""
    grouped = results.groupby("attack", sort=False)
    return grouped[columns].agg(mean).assign(views=grouped.size())[["views", *columns]]


def _meta(run: Path) -> dict:
    """meta.json flattened to columns (``dpsgd.epsilon``, ``versions.torch``, ...).

    Its status is the one a reader sees: ``interrupted`` when the process writing the run died.
    """
    store = RunStore(run)
    return {**pd.json_normalize(store.meta()).to_dict("records")[0], "status": store.status()}
