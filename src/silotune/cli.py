"""`silotune` command line: `silotune run CONFIG.toml [--set section.key=value ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.text import Text

from silotune import __version__
from silotune.errors import UserError

_EPILOG = """\
examples:
  silotune run configs/demo.toml
  silotune run configs/tiny.toml --set train.rounds=3 --set partition.clients=4 --out runs/try
  silotune run configs/demo.toml --set experiment.algorithms='["fedit"]'

Every key of a config can be overridden with --set; values are read as TOML
(numbers, true/false, ["lists"]) and otherwise taken as text.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="silotune",
        description="Fine-tune language models on private data that stays in its silos.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"silotune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run an experiment from a TOML config",
        description=(
            "Run the algorithms a config lists (e.g. FedIT, LocIT, CenIT) on the same data split "
            "and budget, and write summary.json, metrics.jsonl, adapters/, report.md and plots/."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    run.add_argument("config", type=Path, help="experiment config (TOML), e.g. configs/demo.toml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (must not exist); default runs/<experiment name>-<timestamp>",
    )
    run.add_argument(
        "--verbose", action="store_true", help="show Flower, Ray and transformers logs"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `silotune` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Tables of results are wide: keep them readable when output goes to a file or a pipe.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    if not args.verbose:
        quiet_libraries()
    try:
        if args.command == "run":
            return _run(args, console)
    except UserError as exc:
        message = Text.assemble(("error: ", "bold red"), str(exc))
        Console(stderr=True).print(message, soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    return 1


def _run(args: argparse.Namespace, console: Console) -> int:
    from silotune.config import load_config
    from silotune.runner import plan_experiment, run_experiment, run_sweep

    config = load_config(args.config, args.overrides)
    if config.sweep.key:
        run_sweep(config, args.out, console, verbose=args.verbose)
    else:
        run_experiment(plan_experiment(config, args.out), console, verbose=args.verbose)
    return 0


def quiet_libraries() -> None:
    """Keep library chatter (Flower, Ray, transformers, datasets) out of the results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    import flwr.common.logger  # noqa: F401  (configures its logger on import; quiet it after)

    logging.getLogger("flwr").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
