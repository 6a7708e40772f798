"""`silotune` command line: `run` an experiment; `audit` its ε; `attack` or `eval` a finished run;
`certs`, `split-server`, `split-client`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from silotune.cli_parser import build_parser
from silotune.disk import check_writable, on_full_disk
from silotune.errors import UserError
from silotune.logs import install as route_logs
from silotune.procs import run_command
from silotune.split.process import shorten_spin


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `silotune` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Tables of results are wide: keep them readable when output goes to a file or a pipe.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    route_logs(verbose=getattr(args, "verbose", False))
    handler = {
        "run": _run,
        "audit": _audit,
        "certs": _certs,
        "split-server": _split_server,
        "split-client": _split_client,
        "attack": _attack,
        "deploy": _deploy,
        "plan": _plan,
        "eval": _eval,
    }[args.command]
    go_on = _AFTER_FULL_DISK.get(args.command, "free space and run the command again")
    return run_command(lambda: handler(args, console), go_on)


# How to go on after the disk filled up (`run` names its own folder).
_SPLIT_GO_ON = "what --out holds stays: free space, then rerun the command with --resume"
_AFTER_FULL_DISK = {"split-server": _SPLIT_GO_ON, "split-client": _SPLIT_GO_ON}


def _run(args: argparse.Namespace, console: Console) -> int:
    from silotune.config import load_config
    from silotune.repeats import resume, run
    from silotune.run_folder import work_folder
    from silotune.runner import default_out

    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None:
            raise UserError(
                "--resume continues a run with its own config and folder: give only --resume DIR"
            )
        with on_full_disk(f"free space, then `silotune run --resume {args.resume}` again"):
            resume(args.resume, console, verbose=args.verbose)
        return 0
    if args.config is None:
        raise UserError("give a config file (e.g. configs/demo.toml) or --resume DIR")
    config = load_config(args.config, args.overrides)
    out = args.out or default_out(config)
    check_writable(out, "--out")
    work = work_folder(out)
    with on_full_disk(f"{work} stays resumable: free space, then `silotune run --resume {work}`"):
        run(config, out, console, verbose=args.verbose)
    return 0


def _audit(args: argparse.Namespace, console: Console) -> int:
    """`audit canaries CONFIG`: the experiment, run with the canary audit on."""
    args.overrides = [*args.overrides, "privacy.audit=true"]
    args.resume = None
    return _run(args, console)


def _plan(args: argparse.Namespace, console: Console) -> int:
    import torch

    from silotune.config import load_config
    from silotune.modeling.load import resolve_model
    from silotune.modeling.memory import gib, plan_run
    from silotune.modeling.placement import planned_placement, resolve_placement
    from silotune.modeling.shapes import model_config

    config = load_config(args.config, args.overrides)
    if args.device is None:
        placement = resolve_placement(config)
    else:
        placement = planned_placement(config, args.device)
    if args.device == "cuda" and args.memory_gib is None and not torch.cuda.is_available():
        raise UserError("planning for a GPU this machine lacks: give its --memory-gib")
    capacity = gib(args.memory_gib) if args.memory_gib is not None else None
    plan = plan_run(config, model_config(resolve_model(config.model).location), placement, capacity)
    console.print(plan.table())
    plan.check()
    return 0


def _deploy(args: argparse.Namespace, console: Console) -> int:
    from silotune.config import load_config
    from silotune.deploy.local import deploy_local
    from silotune.run_folder import work_folder
    from silotune.runner import default_out

    config = load_config(args.config, args.overrides)
    out = args.out or default_out(config)
    check_writable(out, "--out")
    try:
        deploy_local(config, out, console, args.timeout)
    except KeyboardInterrupt:
        work = work_folder(out)
        console.print(f"every process stopped; to deploy again, first remove {work} (rm -r)")
        raise
    console.print(f"deployed run finished; report: {out / 'report.md'}")
    return 0


def _attack(args: argparse.Namespace, console: Console) -> int:
    from silotune.attacks.audit import audit
    from silotune.attacks.target import open_run, run_folders
    from silotune.config import load_config
    from silotune.run_folder import RunFolder

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [o for o in args.overrides if not o.strip().startswith("attack.")]
    if bad:
        raise UserError(f"attack only takes --set attack.KEY=VALUE, got {bad[0]!r}")
    root = open_run(run_folders(args.run_dir)[0]).root
    settings = load_config(RunFolder(root).config, args.overrides).attack
    check_writable(args.run_dir, "run_dir")  # privacy.json and report.md are written into it
    found = audit(args.run_dir, kinds, settings, log=console.print)
    console.print(f"attacked {', '.join(found)}; see privacy.json and report.md in {args.run_dir}")
    return 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    """`eval TARGET --tasks ...`: lm-eval benchmarks on a finished run's models."""
    from silotune.evaluation.lm_eval import evaluate_folder

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.batch_size < 1:
        raise UserError("--batch-size must be 1 or more")
    check_writable(args.target, "TARGET")  # eval/ is written into it
    evaluate_folder(
        args.target,
        tasks,
        client=args.client,
        limit=args.limit or None,
        batch_size=args.batch_size,
        log=console.print,
    )
    return 0


def _certs(args: argparse.Namespace, console: Console) -> int:
    from silotune.security.tls import create_dev_pki

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    check_writable(args.dir, "DIR")
    create_dev_pki(args.dir, clients, hosts, overwrite=args.overwrite)
    console.print(f"certificates for the server ({', '.join(hosts)}) and {clients} in {args.dir}")
    return 0


def _split_certs(args: argparse.Namespace) -> Path | None:
    if args.insecure == (args.certs is not None):
        raise UserError("give either --certs DIR (mutual TLS) or --insecure (tests only)")
    certs: Path | None = args.certs
    return certs


def _split_server(args: argparse.Namespace, console: Console) -> int:
    shorten_spin()  # before torch loads
    from silotune.config import load_config
    from silotune.split.roles import run_server

    config = load_config(args.config, args.overrides, algorithm_checks=False)
    certs = _split_certs(args)
    if args.out is not None:
        check_writable(args.out, "--out")
    try:
        expected, allowed = _server_clients(args.clients)
        summary = run_server(
            config, args.listen, certs, expected, args.out, args.resume, allowed=allowed
        )
    except KeyboardInterrupt:
        if args.out is not None:
            console.print(
                f"middle adapter saved in {args.out}; to go on from the last finished round, "
                "run the same command with --resume"
            )
        raise
    console.print(f"split server done: {summary.steps} steps")
    return 0


def _server_clients(value: str) -> tuple[int, set[str] | None]:
    """`--clients`: a count (no allowlist of its own) or the allowed ids (as many expected)."""
    from silotune.security.tls import check_client_id

    if value.strip().isdigit():
        return int(value), None
    ids = {check_client_id(c.strip()) for c in value.split(",") if c.strip()}
    if not ids:
        raise UserError(f"--clients {value!r}: give client ids (a,b,c) or a number")
    return len(ids), ids


def _split_client(args: argparse.Namespace, console: Console) -> int:
    shorten_spin()  # before torch loads
    from silotune.config import load_config
    from silotune.split.roles import run_client

    config = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / f"split-{args.id}"
    certs = _split_certs(args)
    check_writable(out, "--out")
    try:
        report = run_client(
            config, args.id, args.server, certs, args.data, args.eval, out, resume=args.resume
        )
    except KeyboardInterrupt:
        console.print(
            f"finished rounds are saved in {out}; to go on, run the same command with --resume "
            "(against a server resumed with --resume)"
        )
        raise
    final = report.rounds[-1].metrics if report.rounds else {}
    console.print(f"split client {args.id} done: {final}; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
