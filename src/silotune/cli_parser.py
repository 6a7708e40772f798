"""The `silotune` command line's arguments: one builder per command (`cli.py` runs them)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from silotune import __version__

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
    audit = commands.add_parser(
        "audit",
        help="check a run's ε empirically: train with secret canaries, bound ε from below",
        description=(
            "`audit canaries CONFIG` runs the experiment with [privacy] audit = true: random "
            "secret records go into one client's data, each with probability 1/2, and after "
            "training the one-run method of Steinke, Nasr and Jagielski turns how well they can "
            "be told apart into a lower bound on ε at 95 % confidence, reported beside the "
            "privacy ledger's ε."
        ),
    )
    audit.add_argument("kind", choices=["canaries"], help="the audit to run")
    audit.add_argument("config", type=Path, help="experiment config (TOML)")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    audit.add_argument("--out", type=Path, default=None, help="output folder (must not exist)")
    audit.add_argument("--verbose", action="store_true", help="show library logs")
    _add_split_commands(commands)
    _add_attack_command(commands)
    _add_plan_command(commands)
    _add_deploy_command(commands)
    _add_eval_command(commands)
    return parser


def _add_eval_command(commands: Any) -> None:
    """`eval`: standard benchmarks (lm-eval) on a finished run's models."""
    evaluate = commands.add_parser(
        "eval",
        help="score a run's adapters and the base model on lm-eval benchmarks",
        description=(
            "Run EleutherAI's lm-evaluation-harness on the models TARGET holds (each algorithm's "
            "adapter; FedPIT's global + one client's private; a split client's whole model) and "
            "on the base model, and write the scores with lm-eval's standard errors into "
            "TARGET/eval/lm-eval.json and eval/lm-eval.md."
        ),
        epilog=(
            "examples:\n"
            "  silotune eval runs/demo --tasks flowertune-medical\n"
            "  silotune eval runs/demo/fedpit --tasks pubmedqa --client 2 --limit 100\n"
            "  silotune eval runs/demo/fedit/adapters/global --tasks my_tasks/qa.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "target", type=Path, help="a run folder, one algorithm's folder or an adapter folder"
    )
    evaluate.add_argument(
        "--tasks",
        required=True,
        help=(
            "comma-separated: groups (flowertune-medical, flowertune-general, fl-glm), lm-eval "
            "task names, or paths of task YAML files or folders"
        ),
    )
    evaluate.add_argument(
        "--client", type=_count, default=0, help="whose model, where each client has its own"
    )
    evaluate.add_argument(
        "--limit", type=_count, default=0, help="score at most N records per task (0: all)"
    )
    evaluate.add_argument("--batch-size", type=_count, default=8, help="lm-eval's batch size")
    evaluate.add_argument("--verbose", action="store_true", help="show library logs")


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), got {text!r}")
    return int(text)


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
        "--timeout", type=_positive, default=3600.0, help="give up after this many seconds"
    )


def _positive(text: str) -> float:
    """An argparse type: a finite number above 0 (NaN would pass any comparison)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


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
        "--memory-gib", type=_positive, help="the memory that device has free (default: this one's)"
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
        "--clients",
        default="0",
        help=(
            "the client ids allowed to connect (a,b,c; stop once they all ended), or a count "
            "to stop after (0: never); by default any id in --certs DIR/clients"
        ),
    )
    client.add_argument("--id", required=True, help="this client's id (its certificate's name)")
    client.add_argument("--server", required=True, help="host:port of the split server")
    client.add_argument("--data", type=Path, required=True, help="this client's records")
    client.add_argument("--eval", type=Path, required=True, help="held-out records")
