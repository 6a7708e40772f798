"""Runs that repeat the experiment: a sweep over one setting, repeated seeds, and their resume.

A sweep runs the experiment once per value into OUT/<key>=<value>/; experiment.seeds runs it
once per seed into OUT/seed=<S>/ (inside each sweep value when both are set). Each repetition
is an ordinary experiment folder, so a resumed run skips the finished ones, continues the one
that stopped and starts the rest; the repetitions' report is written once all have finished.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from silotune.config import Config, load_config, seed_variants, sweep_variants
from silotune.errors import ConfigError, UserError
from silotune.report.seeds import write_seeds_report
from silotune.report.sweep import write_sweep_report
from silotune.run_folder import (
    RunFolder,
    finished_folder,
    refuse_leftover,
    work_folder,
    write_json,
)
from silotune.runner import default_out, plan_experiment, run_experiment

# (label, value, finished folder) of each repetition, in order -> the repetitions' report.
Report = Callable[[Path, list[tuple[str, str, Path]]], None]


def run(
    config: Config,
    out: Path | None,
    console: Console,
    verbose: bool = False,
    resuming: bool = False,
) -> Path:
    """Run `config` into `out`: its sweep, its seeds, or the experiment once."""
    if config.sweep.key:
        return run_sweep(config, out, console, verbose, resuming)
    if config.experiment.seeds:
        return run_seeds(config, out, console, verbose, resuming)
    return run_experiment(plan_experiment(config, out, resuming), console, verbose)


def resume(folder: Path, console: Console, verbose: bool = False) -> Path:
    """Continue the interrupted run whose output folder (or its .incomplete twin) is `folder`."""
    out = finished_folder(folder)
    work = work_folder(out)
    if not work.is_dir():
        if out.is_dir():
            raise UserError(f"{out} has already finished; there is nothing to resume")
        raise UserError(f"no interrupted run at {folder} (expected a folder {work})")
    config_file = RunFolder(work).config
    if not config_file.is_file():
        raise UserError(
            f"{work} holds no {config_file.name}: the run stopped before it started training; "
            f"start it again with `silotune run`"
        )
    config = load_config(config_file)
    console.print(f"resuming {config.experiment.name} in {work}")
    return run(config, out, console, verbose, resuming=True)


def run_sweep(
    config: Config,
    out: Path | None,
    console: Console,
    verbose: bool = False,
    resuming: bool = False,
) -> Path:
    """Run the experiment once per swept value into OUT/<key>=<value>/, then compare them."""
    key = config.sweep.key
    variants = [
        (label, sub, f"{key} = {value}")
        for (label, sub), value in zip(sweep_variants(config), config.sweep.values, strict=True)
    ]

    def report(root: Path, done: list[tuple[str, str, Path]]) -> None:
        write_sweep_report(root, key, done)

    values = dict(zip((label for label, _, _ in variants), config.sweep.values, strict=True))
    return _repeat(config, out, console, verbose, resuming, variants, values, report, "sweep")


def run_seeds(
    config: Config,
    out: Path | None,
    console: Console,
    verbose: bool = False,
    resuming: bool = False,
) -> Path:
    """Run the experiment once per seed of experiment.seeds into OUT/seed=<S>/, then report
    each result's mean and spread over the seeds."""
    variants = [(label, sub, f"seed {sub.experiment.seed}") for label, sub in seed_variants(config)]
    values = {label: str(sub.experiment.seed) for label, sub, _ in variants}
    return _repeat(
        config, out, console, verbose, resuming, variants, values, write_seeds_report, "seeds"
    )


def _repeat(
    config: Config,
    out: Path | None,
    console: Console,
    verbose: bool,
    resuming: bool,
    variants: list[tuple[str, Config, str]],
    values: dict[str, str],
    report: Report,
    what: str,
) -> Path:
    """Run each (label, config, heading) of `variants` into OUT/<label>/, then `report`."""
    out = out or default_out(config)
    if out.exists():
        raise ConfigError(f"output folder {out} already exists; pass another --out or remove it")
    if not resuming:
        refuse_leftover(out)
    work = RunFolder(work_folder(out))
    if not work.root.is_dir():  # a repetition inside a sweep may not have started yet
        work.root.mkdir(parents=True)
        write_json(work.config, config.to_dict())  # first: a resume reads it
    done = []
    for label, sub, heading in variants:
        folder = work.root / label
        if not folder.is_dir():  # a resumed run skips the repetitions that finished
            console.rule(heading)
            run(sub, folder, console, verbose, resuming)
        done.append((label, values[label], folder))
    report(work.root, done)
    work.finish()
    console.print(f"{what} finished; report: {RunFolder(out).report}")
    return out
