"""Run an experiment: load and split data, load the model, run each algorithm, write the results.

Output layout: with one algorithm, OUT is that algorithm's run folder; with several, OUT holds a
run folder per algorithm plus a side-by-side `report.md` and `comparison.json`. Work happens in
`OUT.incomplete` and is renamed to OUT only when everything is written. An interrupted run keeps
its checkpoints there; `resume(OUT)` continues it (finished algorithms are not run again, a
federated one goes on from its last finished round). A new run never deletes an OUT.incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from silotune.algorithms import ALGORITHMS
from silotune.attacks.audit import audit
from silotune.checkpoint import load_result, load_round, save_result
from silotune.config import Config
from silotune.data.load import load_records
from silotune.data.partition import Partitions, split_dataset
from silotune.data.private import check_partitions, write_partitions
from silotune.data.sft import tokenize_dataset
from silotune.errors import ConfigError, UserError
from silotune.evaluation.evaluator import EvalSet, build_eval_set
from silotune.evaluation.intervals import BASE, PER_RECORD, PerRecord
from silotune.evaluation.judge import Judge, JudgeResult, bilateral_win_rate, build_judge
from silotune.evaluation.per_client import (
    base_on_clients,
    client_models,
    pooled_loss,
    score_clients,
)
from silotune.jobs import AlgorithmResult, AlgorithmSpec, Job, RoundLog
from silotune.logs import to_file
from silotune.modeling.adapters import adapter_nbytes
from silotune.modeling.load import resolve_model
from silotune.modeling.memory import plan_run
from silotune.modeling.placement import resolve_placement
from silotune.modeling.shapes import model_config
from silotune.privacy.audit import (
    Canaries,
    audit_result,
    describe_audit,
    insert_canaries,
    prepare_canaries,
    save_canaries,
)
from silotune.progress import PROGRESS_DIR, Watcher, reporting, tick
from silotune.report.context import RunContext
from silotune.report.outputs import comparison_intervals, write_comparison, write_run
from silotune.report.per_client import own_scores
from silotune.report.terminal import (
    clients_table,
    differences_table,
    per_client_table,
    results_table,
)
from silotune.run_folder import (
    RunFolder,
    refuse_leftover,
    work_folder,
    write_json,
)
from silotune.tracking import Trackers, check_installed
from silotune.training.workbench import Workbench


@dataclass(frozen=True)
class Experiment:
    """A validated config with its output folder chosen."""

    config: Config
    out: Path
    specs: list[AlgorithmSpec]
    resume: bool = False  # continue from the checkpoints in OUT.incomplete


def plan_experiment(config: Config, out: Path | None, resuming: bool = False) -> Experiment:
    """Resolve algorithms and the output folder; refuse to overwrite an existing result."""
    specs = [ALGORITHMS.get(name) for name in config.experiment.algorithms]
    out = out or default_out(config)
    if out.exists():
        raise ConfigError(f"output folder {out} already exists; pass another --out or remove it")
    if not resuming:
        refuse_leftover(out)
    return Experiment(config, out, specs, resume=resuming and work_folder(out).is_dir())


def default_out(config: Config) -> Path:
    """runs/<experiment name>-<timestamp>"""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.experiment.name}-{stamp}"


def run_experiment(exp: Experiment, console: Console, verbose: bool = False) -> Path:
    """Run every algorithm of `exp` and return the finished output folder."""
    cfg = exp.config
    started = time.perf_counter()
    check_installed(cfg)  # a tracker's library, likewise
    if cfg.eval.lm_eval_tasks:  # a misspelt task fails now, not after the training
        from silotune.evaluation.lm_eval import resolve_tasks, task_manager

        task_manager(resolve_tasks(list(cfg.eval.lm_eval_tasks)))
    loaded = load_records(cfg.data)
    split = split_dataset(loaded.dataset, cfg.data, cfg.partition, cfg.experiment.seed)
    canaries = None
    if cfg.privacy.audit:  # before the split is written: every algorithm trains on them
        parts = RunFolder(work_folder(exp.out)).partitions
        canaries = prepare_canaries(cfg, parts, exp.resume)
        split = insert_canaries(split, canaries)
    console.print(
        f"[bold]{cfg.experiment.name}[/]: {loaded.source_rows} records read"
        + (f", {loaded.describe_dropped()}" if loaded.dropped else "")
        + f"; {len(split.eval)} held out for evaluation"
    )
    console.print(clients_table(split))

    work = RunFolder(work_folder(exp.out))
    if not exp.resume:
        work.root.mkdir(parents=True)
    with to_file(work.root):  # third-party logs: not in the terminal, kept with the run
        try:
            rows = {"source_rows": loaded.source_rows, "dropped": dict(loaded.dropped)}
            _run_in(work, exp, split, canaries, rows, console, verbose)
        except UserError:
            if not exp.resume:
                shutil.rmtree(work.root, ignore_errors=True)
            raise
        except BaseException:
            console.print(
                f"[red]run stopped; partial output left in {work.root} (not a result); continue "
                f"it with `silotune run --resume {work.root}`[/]"
            )
            raise
        shutil.rmtree(work.checkpoints, ignore_errors=True)
        for state in work.client_states():
            shutil.rmtree(state, ignore_errors=True)
        work.finish()  # the log file stays open through the rename
        _after_training(exp, console)
    console.print(
        f"finished in {time.perf_counter() - started:.0f} s; report: {RunFolder(exp.out).report}"
    )
    return exp.out


def _base_metrics(
    work: RunFolder,
    bench: Workbench,
    eval_set: EvalSet,
    judge: Judge | None,
    cfg: Config,
    console: Console,
) -> tuple[dict[str, float], PerRecord]:
    """The base model's held-out metrics and per-record scores (kept: a resume reads them)."""
    base_file = work.base_metrics
    if base_file.is_file():
        base = json.loads(base_file.read_text(encoding="utf-8"))
        return base, base.pop(PER_RECORD, {})  # absent from older checkpoints
    console.print("evaluating the base model ...")
    base_eval = bench.evaluate_base(eval_set)
    base = base_eval.metrics()
    if judge is not None:
        base["judge_win_rate"] = _judged(judge, cfg, eval_set, [base_eval.predictions]).win_rate
    work.checkpoints.mkdir(exist_ok=True)
    # Its per-record scores ride along: the reference of every interval.
    write_json(base_file, {**base, PER_RECORD: base_eval.per_record})
    return base, base_eval.per_record


def _after_training(exp: Experiment, console: Console) -> None:
    """The attacks and lm-eval on the finished folder: a failing one never costs the training
    results."""
    cfg = exp.config
    if attacks := list(cfg.attack.kinds):
        console.print(f"privacy attacks: {', '.join(attacks)}")
        try:
            found = audit(exp.out, attacks, cfg.attack, log=console.print)
        except UserError as exc:
            console.print(
                f"[red]attack failed: {exc}[/]\nthe training results in {exp.out} are complete; "
                f"fix the attack settings and run `silotune attack {','.join(attacks)} {exp.out}`"
            )
            raise
        with Trackers(cfg, exp.out, exp.out) as trackers:  # the training's tracker runs, again
            for algorithm, results in found.items():
                trackers.attacks(algorithm, results, cfg.train.rounds)
    if tasks := list(cfg.eval.lm_eval_tasks):
        from silotune.evaluation.lm_eval import evaluate_folder  # lm-eval loads slowly

        try:
            evaluate_folder(exp.out, tasks, log=console.print)
        except UserError as exc:
            console.print(
                f"[red]lm-eval failed: {exc}[/]\nthe training results in {exp.out} are complete; "
                f"fix the tasks and run `silotune eval {exp.out} --tasks {','.join(tasks)}`"
            )
            raise


def _run_in(
    work: RunFolder,
    exp: Experiment,
    split: Partitions,
    canaries: Canaries | None,
    data_rows: dict[str, object],
    console: Console,
    verbose: bool,
) -> None:
    """Everything after the data split, written into the work folder."""
    cfg = exp.config
    if exp.resume:
        check_partitions(work.partitions, split)
    else:
        if canaries is not None:  # first: a resume reads them back to rebuild the split
            save_canaries(work.partitions, canaries)
        _write_split(work, split, cfg)
    with console.status(f"planning memory for {cfg.model.name} ..."):
        source = resolve_model(cfg.model)
        plan = plan_run(cfg, model_config(source.location), resolve_placement(cfg))
    console.print(plan.table())
    plan.check()
    with console.status(f"loading model {cfg.model.name} ..."):
        bench = Workbench(source, cfg)
        eval_set = build_eval_set(split.eval, bench.tokenizer, cfg.data)
        client_sets = [build_eval_set(e, bench.tokenizer, cfg.data) for e in split.client_evals]
        client_examples = [
            tokenize_dataset(part, bench.tokenizer, cfg.data.prompt_style, cfg.data.max_length)
            for part in split.clients
        ]
    console.print(f"model: {source.description}")
    judge = None
    if cfg.judge.kind != "none":
        with console.status(f"setting up the {cfg.judge.kind} judge ..."):
            judge = build_judge(cfg.judge, bench.placement)
    runs: list[tuple[AlgorithmSpec, AlgorithmResult, dict[str, object]]] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    ticks = work.root / PROGRESS_DIR
    with (
        progress,
        Watcher(work.root, progress, console) as watcher,
        reporting(ticks, "runner"),
        Trackers(cfg, work.root, exp.out) as trackers,
    ):
        base, base_per_record = _base_metrics(work, bench, eval_set, judge, cfg, console)
        watcher.drain()
        console.print(f"base model: {_fmt_metrics(base)}")
        ctx = RunContext(
            config=cfg,
            model=source.description,
            base=base,
            partition_stats=split.stats(),
            adapter_bytes=adapter_nbytes(bench.initial),
            data_rows=data_rows,
        )

        for spec in exp.specs:
            folder = work.result(spec.name, several=len(exp.specs) > 1)
            finished = load_result(work.result_checkpoint(spec.name))
            if finished is not None and folder.summary.is_file():
                progress.console.print(f"  {spec.name}: finished before the interruption")
                summary = json.loads(folder.summary.read_text(encoding="utf-8"))
                runs.append((spec, finished, summary))
                continue
            task = progress.add_task(f"{spec.name} rounds", total=cfg.train.rounds)

            def on_round(log: RoundLog, name: str = spec.name, task_id: TaskID = task) -> None:
                watcher.drain()  # the workers' last lines before the round's
                progress.advance(task_id)
                progress.console.print(f"  {name} round {log.round}: {_fmt_metrics(log.metrics)}")
                trackers.round(name, log)

            job = Job(
                config=cfg,
                source=source,
                split=split,
                client_examples=client_examples,
                eval_set=eval_set,
                workbench=bench,
                run=work,
                client_resources=plan.client_resources(os.cpu_count() or 1),
                on_round=on_round,
                verbose=verbose,
            )
            if exp.resume and (done := load_round(work.round_checkpoint(spec.name))):
                for log in done.rounds:  # a stop between a checkpoint and its round's log
                    trackers.round(spec.name, log)
            t0 = time.perf_counter()
            result = spec.run(job)
            if judge is not None:
                progress.console.print(f"  {spec.name}: judging against the references ...")
                result.judge = _judged(judge, cfg, eval_set, result.final_predictions)
                result.rounds[-1].metrics["judge_win_rate"] = result.judge.win_rate
            if client_sets:
                progress.console.print(f"  {spec.name}: scoring on each client's records ...")
                models = client_models(spec, result, work, len(client_sets))
                result.per_client_eval = (
                    {"not_scored": models}
                    if isinstance(models, str)
                    else score_clients(bench, models, client_sets)
                )
            wall_s = time.perf_counter() - t0
            canary_audit = None
            if canaries is not None:
                records = len(split.clients[canaries.client])
                canary_audit = audit_result(spec, result, bench, canaries, cfg, records)
                progress.console.print(f"  {spec.name}: {describe_audit(canary_audit)}")
            summary = write_run(
                folder.root, spec, result, ctx, bench.save, wall_s, canary_audit, base_per_record
            )
            trackers.finished(spec.name, summary, folder.root, len(result.rounds))
            save_result(work.result_checkpoint(spec.name), result)
            runs.append((spec, result, summary))
            watcher.clear()
        scores = {BASE: base_per_record, **{s.name: r.final_per_record for s, r, _ in runs}}
        console.print("  comparing: paired intervals over the held-out records ...")
        tick("comparing", 0, 1)
        intervals = comparison_intervals(scores, cfg.eval.references)
        per_client: dict[str, Any] = {}
        if client_sets:
            summaries = {s.name: summary for s, _, summary in runs}
            console.print("  base model: scoring on each client's records ...")
            base_own = base_on_clients(bench, client_sets)
            per_client = comparison_intervals(
                {BASE: base_own, **own_scores(summaries)}, cfg.eval.references
            )
            per_client["base_eval_loss"] = pooled_loss(base_own)
        if len(exp.specs) > 1:
            write_comparison(work.root, runs, ctx, intervals, per_client)
    console.print(results_table(runs, base))
    _print_differences(console, intervals, "differences on the shared held-out records")
    if per_client:
        summaries = {s.name: summary for s, _, summary in runs}
        console.print(per_client_table(summaries, per_client["base_eval_loss"]))
        _print_differences(console, per_client, "differences on each client's own records")


def _print_differences(console: Console, intervals: dict[str, Any], title: str) -> None:
    table = differences_table(intervals, title)
    if table is not None:
        console.print(table, intervals.get("about", ""))


def _judged(
    judge: Judge, cfg: Config, eval_set: EvalSet, predictions: list[list[str]]
) -> JudgeResult:
    """Bilateral win rate over the references, averaged over the models (e.g. one per client)."""
    limit = cfg.judge.max_items or len(eval_set.references)
    results = [  # a model generated on the first eval.generate_n records only
        bilateral_win_rate(judge, eval_set.instructions[:n], preds[:n], eval_set.references[:n])
        for preds in predictions
        if (n := min(limit, len(preds)))
    ]
    return JudgeResult(
        win_rate=sum(r.win_rate for r in results) / len(results),
        items=sum(r.items for r in results),
        unparsed=sum(r.unparsed for r in results),
        judge=judge.label,
    )


def _write_split(work: RunFolder, split: Partitions, cfg: Config) -> None:
    """Each client's records in its own file (what that client alone reads), plus the eval set."""
    write_partitions(work.partitions, split)
    write_json(work.partition_stats, split.stats())
    write_json(work.config, cfg.to_dict())


def _fmt_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
