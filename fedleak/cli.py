"""The ``fedleak`` command: list plugins, run experiments, re-attack runs, sweep and report.

Configuration mistakes print one clear message (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedleak import config, pipeline, progress
from fedleak.federation import Diverged
from fedleak.metrics import HEADLINE
from fedleak.registry import ConfigError
from fedleak.store import RunStore


def _kinds() -> dict:
    from fedleak.attacks import ATTACKS
    from fedleak.data import DATASETS, PARTITIONS
    from fedleak.defenses import DEFENSES
    from fedleak.models import MODELS
    from fedleak.modifiers import MODIFIERS
    from fedleak.pruning import PRUNERS
    from fedleak.selection import SELECTORS
    from fedleak.server import SERVER_STRATEGIES
    from fedleak.training import TRAINERS

    kinds = {
        "attacks": ATTACKS,
        "defenses": DEFENSES,
        "trainers": TRAINERS,
        "selectors": SELECTORS,
        "servers": SERVER_STRATEGIES,
        "modifiers": MODIFIERS,
        "pruners": PRUNERS,
        "datasets": DATASETS,
        "partitions": PARTITIONS,
        "models": MODELS,
    }
    try:  # runners need Flower; listing the rest must not
        from fedleak.sim.runners import RUNNERS

        kinds["runners"] = RUNNERS
    except ImportError:
        pass
    return kinds


def cmd_list(args: argparse.Namespace) -> None:
    """Print every registered plugin (of one kind) with its one-line summary.

    Under a plugin, what it declares it sends beside the model: its leakage surface.
    """
    kinds = _kinds()
    if args.kind and args.kind not in kinds:
        from fedleak.registry import suggest

        raise ConfigError(
            f"Unknown kind {args.kind!r}.{suggest(args.kind, list(kinds))} "
            f"Known: {', '.join(kinds)}."
        )
    for kind, registry in kinds.items():
        if args.kind in (None, kind):
            print(f"{kind}:")
            for name in registry.names():
                print(f"  {name:<20} {registry.summary(name)}")
                for message, reveals in getattr(registry[name], "sends", {}).items():
                    print(f"  {'':<20}   sends {message!r}: {reveals}")


def cmd_run(args: argparse.Namespace) -> None:
    """Load, check, federate, attack, and print the summary."""
    exp = config.load(args.config, args.override or [])
    _flower_log(args.verbose)
    out = args.out or pipeline.default_dir(exp)  # known before the run: the display follows it
    with progress.Watch(exp, out):
        store = pipeline.run(exp, out)
    print(summary(store))
    print(f"\nrun directory: {store.root}")


def cmd_attack(args: argparse.Namespace) -> None:
    """Attack the stored views of an existing run directory (finished rows are kept)."""
    store = RunStore(args.run_dir)
    if not (store.root / "config.toml").is_file():
        raise ConfigError(f"{store.root} is not a run directory (no config.toml)")
    exp = config.load(store.root / "config.toml", args.override or [])
    pipeline.resume(exp, store)
    print(summary(store))
    print(f"status: {store.status()}")


def cmd_bench(args: argparse.Namespace) -> int:
    """Check a sweep completely, run its unfinished cells, then write the report."""
    from fedleak import bench, report

    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    sweep = bench.load(args.sweep, args.override or [])
    cells = sweep.cells()
    out = args.out or bench.default_dir(sweep)
    if args.dry_run:
        print(f"{sweep.name}: {len(cells)} cells, all checked; results would go to {out}")
        for cell in cells:
            print(f"  {cell.id}")
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import warnings

    # Opacus's hooks warn on every DP-SGD step of a model whose inputs need no gradient (they
    # never do here); in a sweep of thousands of steps that buries the progress lines.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    _flower_log(args.verbose)
    with progress.SweepWatch(Path(out), len(cells)):
        failed = bench.run(sweep, out)
    md, png = report.render(out, args.drops)
    print(f"results: {Path(out) / 'results.csv'}\nreport:  {md}\nplot:    {png}")
    if failed:
        print(
            f"fedleak: {len(failed)} of {len(cells)} cells failed or were skipped: "
            f"{', '.join(failed)}; their meta.json says why, and running the same command "
            "again retries them.",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> None:
    """Render report.md and privacy_utility.png from a sweep directory's results.csv."""
    from fedleak import report

    md, png = report.render(args.dir, args.drops)
    print(f"report: {md}\nplot:   {png}")
    # The report covers finished cells; say which are not, and why (a dead writer included).
    cells = sorted((Path(args.dir) / "cells").glob("*/meta.json"))
    unfinished = {m.parent.name: RunStore(m.parent).status() for m in cells}
    if pending := {cell: status for cell, status in unfinished.items() if status != "done"}:
        listed = ", ".join(f"{cell} ({status})" for cell, status in pending.items())
        print(f"not in the report: {listed}", file=sys.stderr)


def cmd_prune(args: argparse.Namespace) -> None:
    """Prune a causal LM standalone; print perplexity, parameters, FLOPs and wall time."""
    from fedleak.pruning import standalone

    cfg = standalone.load(args.config)
    result = standalone.run(cfg)
    pruner = cfg["pruner"]["name"]
    if "dense_perplexity" in result:
        print(f"dense:  perplexity {result['dense_perplexity']:.2f}")
    seconds = result["prune_seconds"]
    print(f"{pruner}: perplexity {result['perplexity']:.2f} (pruned in {seconds:.1f} s)")
    print(
        f"parameters {result['dense_parameters']:,} -> {result['parameters']:,}; "
        f"GFLOPs per token {result['dense_gflops_per_token']:.3f} -> "
        f"{result['gflops_per_token']:.3f}"
    )


def _flower_log(verbose: bool) -> None:
    """Flower configures its logger on import: quiet it (per round INFO) unless asked."""
    import flwr  # noqa: F401 - installs Flower's handler, which we then tune

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


def summary(store: RunStore) -> str:
    """A short table: final utility, then mean privacy metrics per attack (NaN skipped)."""
    from fedleak import results

    lines = []
    if (store.root / "utility.csv").is_file():
        last = results.read(store.root / "utility.csv").iloc[-1]
        lines.append(
            f"utility after round {last['round']:.0f}: test accuracy {last['test_accuracy']:.4f}, "
            f"test loss {last['test_loss']:.4f}"
        )
    if (store.root / "results.csv").is_file():
        scores = results.read(store.root / "results.csv")
        # the modality's headline metrics (metrics.HEADLINE), whichever the results carry
        shown = [k for keys in HEADLINE.values() for k in keys if k in scores] + ["seconds"]
        lines.append(f"{'attack':<16}{'views':>6}" + "".join(f"{k:>11}" for k in shown))
        for name, row in results.summary(scores, shown).iterrows():
            lines.append(
                f"{name:<16}{row['views']:>6.0f}" + "".join(f"{row[k]:>11.3f}" for k in shown)
            )
    return "\n".join(lines)


VERBOSE = "print every round and attack (they always go to the run's run.log) and Flower's log"


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="fedleak", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE)
    # also after the command (fedleak run X -v); SUPPRESS keeps the top-level flag's value
    verbose = {"action": "store_true", "default": argparse.SUPPRESS, "help": VERBOSE}
    sub = p.add_subparsers(dest="command", required=True)
    lst = sub.add_parser("list", help="list registered attacks, defenses, models, ...")
    lst.add_argument("kind", nargs="?", help="one kind, e.g. attacks")
    lst.set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="run an experiment file")
    run.add_argument("config", help="experiment TOML, e.g. simulations/quickstart.toml")
    run.add_argument(
        "-o", "--override", action="append", metavar="KEY=VALUE", help="dotted.key=value"
    )
    run.add_argument("--out", type=Path, help="run directory (default runs/<name>/<timestamp>)")
    run.add_argument("-v", "--verbose", **verbose)
    run.set_defaults(func=cmd_run)
    att = sub.add_parser("attack", help="(re-)attack the stored views of a run directory")
    att.add_argument("run_dir", type=Path)
    att.add_argument(
        "-o", "--override", action="append", metavar="KEY=VALUE", help="e.g. attacks.0.steps=50"
    )
    att.set_defaults(func=cmd_attack)
    drops = {
        "type": float,
        "nargs": "+",
        "default": [1.0, 2.0, 5.0],
        "metavar": "PP",
        "help": "accuracy drops (percentage points) for the equal-utility table (default 1 2 5)",
    }
    ben = sub.add_parser(
        "bench", help="run a privacy-utility sweep (defenses x strengths x seeds), then report"
    )
    ben.add_argument(
        "sweep", help="sweep TOML, e.g. simulations/benchmarks/privacy_utility/digits.toml"
    )
    ben.add_argument(
        "-o",
        "--override",
        action="append",
        metavar="KEY=VALUE",
        help="base experiment (rounds=2, attacks.0.steps=3) or sweep (seeds=[0]) key",
    )
    ben.add_argument(
        "--out", type=Path, help="sweep directory (default runs/bench/<name>); rerun to resume"
    )
    ben.add_argument("--dry-run", action="store_true", help="check the sweep, list its cells")
    ben.add_argument("-v", "--verbose", **verbose)
    ben.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy 2-core box, torch's one thread per core made "
        "DLG 15-35x slower; 0 keeps torch's default)",
    )
    ben.add_argument("--drops", **drops)
    ben.set_defaults(func=cmd_bench)
    pru = sub.add_parser("prune", help="prune a causal LM standalone and print its perplexity")
    pru.add_argument("config", help="pruning TOML, e.g. simulations/pruning/smollm2.toml")
    pru.set_defaults(func=cmd_prune)
    rep = sub.add_parser("report", help="tables and plot from a sweep directory's results.csv")
    rep.add_argument("dir", type=Path)
    rep.add_argument("--drops", **drops)
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedleak`` console script."""
    args = parser().parse_args(argv)
    progress.terminal(args.verbose)
    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"fedleak: error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:  # a result of the experiment, not a bug: no traceback either
        print(f"fedleak: diverged: {err}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
