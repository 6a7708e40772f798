"""`silotune` command line: `run` an experiment; `attack` a finished run; `certs`, `split-server`,
`split-client`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from silotune import __version__
from silotune.errors import UserError

_EPILOG = """\
examples:
  silotune run configs/demo.toml
  silotune run configs/tiny.toml --set train.rounds=3 --set partition.clients=4 --out runs/try
  silotune run configs/demo.toml --set experiment.algorithms='["fedit"]'
  silotune run --resume runs/try.incomplete      # continue an interrupted run

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
    run.add_argument(
        "config", type=Path, nargs="?", help="experiment config (TOML), e.g. configs/demo.toml"
    )
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
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted run in DIR (its OUT or OUT.incomplete folder)",
    )
    run.add_argument(
        "--verbose", action="store_true", help="show Flower, Ray and transformers logs"
    )
    _add_split_commands(commands)
    _add_attack_command(commands)
    _add_plan_command(commands)
    _add_deploy_command(commands)
    return parser


def _add_deploy_command(commands: Any) -> None:
    """`deploy local`: a federation of separate processes on this machine."""
    deploy = commands.add_parser(
        "deploy",
        help="run a federated experiment on Flower's Deployment Engine",
        description=(
            "local: start a SuperLink and one SuperNode per client as separate processes on "
            "this machine (TLS, SuperNode authentication), run the experiment with `flwr run`, "
            "write the results as `silotune run` does, and stop every process."
        ),
    )
    deploy.add_argument("where", choices=["local"], help="where the federation runs")
    deploy.add_argument("config", type=Path, help="experiment config with one federated algorithm")
    deploy.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    deploy.add_argument("--out", type=Path, help="output folder (must not exist)")
    deploy.add_argument(
        "--timeout", type=float, default=3600.0, help="give up after this many seconds"
    )


def _add_plan_command(commands: Any) -> None:
    """`plan`: the memory a config needs, before anything is loaded."""
    plan = commands.add_parser(
        "plan",
        help="estimate the memory a run needs per process, from the model's config alone",
        description=(
            "Estimate each process's peak memory (weights, adapters and optimizer, activations, "
            "runtime) from the model's config.json, the dtype, quantization, LoRA rank, batch "
            "and sequence length, and say whether it fits and how many clients run at once. "
            "`silotune run` prints the same plan and refuses one that cannot fit."
        ),
        epilog=(
            "examples:\n"
            "  silotune plan configs/demo.toml\n"
            "  silotune plan configs/fedpit-7b-qlora.toml --device cuda --memory-gib 24"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("config", type=Path, help="experiment config (TOML)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    plan.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="plan for another machine's device instead of this one's",
    )
    plan.add_argument(
        "--memory-gib", type=float, help="the memory that device has free (default: this one's)"
    )


def _add_attack_command(commands: Any) -> None:
    """`attack`: measure what a finished run leaks."""
    attack = commands.add_parser(
        "attack",
        help="run privacy attacks on a finished run and add them to its report",
        description=(
            "extraction: make the shared adapter recite private training records; membership: "
            "tell training records from unseen ones by their loss; inversion: recover a split "
            "client's text from the activations its server received. Writes privacy.json and a "
            "privacy section of report.md in each attacked run folder."
        ),
        epilog=(
            "examples:\n"
            "  silotune attack extraction,membership runs/privacy-fedpit-vs-fedit\n"
            "  silotune attack inversion runs/split-medical/split --set attack.inversion_steps=100"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    attack.add_argument("kinds", help="comma-separated attacks: extraction, membership, inversion")
    attack.add_argument("run_dir", type=Path, help="a run folder or an experiment folder")
    attack.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="attack.KEY=VALUE",
        help="override an [attack] setting of the run's config; repeatable",
    )
    attack.add_argument("--verbose", action="store_true", help="show library logs")


def _add_split_commands(commands: Any) -> None:
    """`certs`, `split-server` and `split-client`: split learning across machines."""
    certs = commands.add_parser(
        "certs",
        help="create a development CA, a server and per-client certificates (mutual TLS)",
        description=(
            "Write ca.pem, server.pem/.key and clients/<id>.pem/.key into DIR. Give the server "
            "its files and each client ca.pem plus its own pair; keep ca.key offline."
        ),
    )
    certs.add_argument("dir", type=Path, help="output folder")
    certs.add_argument("--clients", required=True, help="comma-separated client ids, e.g. a,b,c")
    certs.add_argument(
        "--hosts",
        default="localhost,127.0.0.1",
        help="comma-separated DNS names / IPs clients use to reach the server",
    )
    certs.add_argument("--overwrite", action="store_true", help="replace existing files")

    server = commands.add_parser(
        "split-server",
        help="serve the middle blocks of a split-learning run (FL-GLM)",
        description="Hold the middle blocks and their adapter; train them for the clients.",
    )
    client = commands.add_parser(
        "split-client",
        help="train the front/back of a split-learning run against a split server",
        description="Hold embeddings, first and last blocks, the data and the labels.",
    )
    for sub in (server, client):
        sub.add_argument("config", type=Path, help="experiment config (TOML or a run's JSON)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
        sub.add_argument("--certs", type=Path, help="folder made by `silotune certs`")
        sub.add_argument(
            "--insecure", action="store_true", help="no TLS (tests on one machine only)"
        )
        sub.add_argument("--out", type=Path, help="where to write results and adapters")
        sub.add_argument("--verbose", action="store_true", help="show library logs")
        sub.add_argument(
            "--resume",
            action="store_true",
            help="go on from the checkpoint of the last finished round in --out",
        )
    server.add_argument("--listen", default="0.0.0.0:50051", help="host:port to listen on")
    server.add_argument(
        "--clients", type=int, default=0, help="stop after this many clients ended (0: never)"
    )
    client.add_argument("--id", required=True, help="this client's id (its certificate's name)")
    client.add_argument("--server", required=True, help="host:port of the split server")
    client.add_argument("--data", type=Path, required=True, help="this client's records")
    client.add_argument("--eval", type=Path, required=True, help="held-out records")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `silotune` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Tables of results are wide: keep them readable when output goes to a file or a pipe.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    if not getattr(args, "verbose", False):
        quiet_libraries()
    try:
        handler = {
            "run": _run,
            "certs": _certs,
            "split-server": _split_server,
            "split-client": _split_client,
            "attack": _attack,
            "deploy": _deploy,
            "plan": _plan,
        }[args.command]
        return handler(args, console)
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
    from silotune.runner import plan_experiment, resume, run_experiment, run_sweep

    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None:
            raise UserError(
                "--resume continues a run with its own config and folder: give only --resume DIR"
            )
        resume(args.resume, console, verbose=args.verbose)
        return 0
    if args.config is None:
        raise UserError("give a config file (e.g. configs/demo.toml) or --resume DIR")
    config = load_config(args.config, args.overrides)
    if config.sweep.key:
        run_sweep(config, args.out, console, verbose=args.verbose)
    else:
        run_experiment(plan_experiment(config, args.out), console, verbose=args.verbose)
    return 0


def _plan(args: argparse.Namespace, console: Console) -> int:
    import torch

    from silotune.config import load_config
    from silotune.modeling.load import resolve_model
    from silotune.modeling.memory import gib, model_config, plan_run
    from silotune.modeling.placement import planned_placement, resolve_placement

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
    from silotune.runner import default_out

    config = load_config(args.config, args.overrides)
    out = deploy_local(config, args.out or default_out(config), console, args.timeout)
    console.print(f"deployed run finished; report: {out / 'report.md'}")
    return 0


def _attack(args: argparse.Namespace, console: Console) -> int:
    from silotune.attacks.audit import audit
    from silotune.attacks.target import open_run, run_folders
    from silotune.config import load_config

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [o for o in args.overrides if not o.strip().startswith("attack.")]
    if bad:
        raise UserError(f"attack only takes --set attack.KEY=VALUE, got {bad[0]!r}")
    root = open_run(run_folders(args.run_dir)[0]).root
    settings = load_config(root / "config.json", args.overrides).attack
    found = audit(args.run_dir, kinds, settings, log=console.print)
    console.print(f"attacked {', '.join(found)}; see privacy.json and report.md in {args.run_dir}")
    return 0


def _certs(args: argparse.Namespace, console: Console) -> int:
    from silotune.security.tls import create_dev_pki

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    create_dev_pki(args.dir, clients, hosts, overwrite=args.overwrite)
    console.print(f"certificates for the server ({', '.join(hosts)}) and {clients} in {args.dir}")
    return 0


def _split_certs(args: argparse.Namespace) -> Path | None:
    if args.insecure == (args.certs is not None):
        raise UserError("give either --certs DIR (mutual TLS) or --insecure (tests only)")
    certs: Path | None = args.certs
    return certs


def _split_server(args: argparse.Namespace, console: Console) -> int:
    from silotune.config import load_config
    from silotune.split.roles import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.overrides)
    certs = _split_certs(args)
    summary = run_server(config, args.listen, certs, args.clients, args.out, args.resume)
    console.print(f"split server done: {summary['steps']} steps")
    return 0


def _split_client(args: argparse.Namespace, console: Console) -> int:
    from silotune.config import load_config
    from silotune.split.roles import run_client

    config = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / f"split-{args.id}"
    certs = _split_certs(args)
    report = run_client(
        config, args.id, args.server, certs, args.data, args.eval, out, resume=args.resume
    )
    final = report["rounds"][-1]["metrics"] if report["rounds"] else {}
    console.print(f"split client {args.id} done: {final}; results in {out}")
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
