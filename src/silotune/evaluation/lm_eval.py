"""Standard benchmarks through EleutherAI's lm-evaluation-harness (lm-eval).

A run's trained models (each algorithm's PEFT adapter; FedPIT's global + one client's private;
a split client's whole-model adapter) and the base model are scored on lm-eval tasks with
lm-eval's own standard errors, into `<target>/eval/lm-eval.json` and `<target>/eval/lm-eval.md`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from silotune.config import Config, load_config
from silotune.errors import UserError
from silotune.modeling.adapters import PRIVATE
from silotune.run_folder import RunFolder, client_adapter_dir, client_name, write_atomic, write_json

# Named suites. FlowerTune's medical track uses CareQA's English multiple-choice part
# (`careqa_en`); SuperGLUE's RTE is `sglue_rte` in lm-eval (`rte` is GLUE's). XSum exists in
# lm-eval 0.4.13 only through the optional `unitxt` package, so it is not in `fl-glm`.
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "flowertune-medical": ("pubmedqa", "medmcqa", "medqa_4options", "careqa_en"),
    "flowertune-general": ("mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"),
    "fl-glm": ("boolq", "sglue_rte", "wic", "record", "cb", "copa", "cnn_dailymail_abisee"),
}

_MEDICAL_SOURCE = "https://flower.ai/benchmarks/llm-leaderboard/medical/"
_GENERAL_SOURCE = "https://flower.ai/benchmarks/llm-leaderboard/nlp/"
# Published rows to put beside ours, per group: accuracy in %, communication in GB.
REFERENCES: dict[str, dict[str, Any]] = {
    "flowertune-medical": {
        "source": _MEDICAL_SOURCE,
        "columns": ["PubMedQA", "MedMCQA", "MedQA", "CareQA"],
        "rows": [
            {
                "model": "Qwen2.5-1.5B-Instruct (team Abdelkareem Elkhateb)",
                "communication_gb": 11.0,
                "average": 46.00,
                "scores": [52.60, 40.81, 40.22, 50.38],
            },
        ],
    },
    "flowertune-general": {
        "source": _GENERAL_SOURCE,
        "columns": ["STEM", "Social Sciences", "Humanities"],
        "rows": [
            {
                "model": "SmolLM2-135M-Instruct (team T-IoI@UNR)",
                "communication_gb": 0.7,
                "average": 21.10,
                "scores": [18.68, 21.90, 22.74],
            },
            {
                "model": "Qwen2.5-1.5B-Instruct (team ZJUDAI)",
                "communication_gb": 0.7,
                "average": 53.32,
                "scores": [47.13, 62.30, 50.54],
            },
        ],
    },
}

_CLIENT_ADAPTER = re.compile(r"^client-\d+$")
_REPORT_LINK = "Standard benchmarks (lm-eval): [eval/lm-eval.md](eval/lm-eval.md)"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    """One model to score: the base model plus these PEFT adapters, all active together."""

    name: str
    adapters: tuple[Path, ...]
    communication: dict[str, Any] | None = None

    @property
    def communication_gb(self) -> float | None:
        """Bytes sent both ways over the whole run, in GB (10^9 bytes) as the leaderboard shows."""
        if not self.communication:
            return None
        return float(self.communication["bytes_up"] + self.communication["bytes_down"]) / 1e9


@dataclass(frozen=True)
class Tasks:
    """What `--tasks` named, resolved: lm-eval task names and the folders that define some."""

    names: tuple[str, ...]
    include_paths: tuple[Path, ...]
    groups: tuple[str, ...]
    needs_defaults: bool


def find_config(target: Path) -> Path:
    """The config.json of the silotune run that `target` (or a folder above it) belongs to."""
    for folder in (target, *list(target.parents)[:4]):
        if (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            return folder / "config.json"
    raise UserError(
        f"{target} is not inside a silotune run (no config.json in it or the folders above); "
        "pass a run folder, an algorithm's result folder or an adapter folder of a run"
    )


def find_candidates(target: Path, root: Path, client: int) -> list[Candidate]:
    """The models TARGET holds: an adapter folder, one algorithm's result, or a run's results."""
    if (target / "adapter_config.json").is_file():
        return [Candidate(_label(target, root), (target,))]
    if RunFolder(target).summary.is_file():
        return [_result_candidate(target, root, client)]
    results = sorted(p.parent for p in target.glob("*/summary.json"))
    if not results:
        raise UserError(
            f"{target} holds no finished result (no summary.json in it or its sub-folders) and "
            "is no adapter folder (no adapter_config.json); pass the output folder of "
            "`silotune run`, one algorithm's folder in it, or an adapters/<name> folder"
        )
    return [_result_candidate(r, root, client) for r in results]


def _label(folder: Path, root: Path) -> str:
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else folder.name


def _result_candidate(result: Path, root: Path, client: int) -> Candidate:
    """One algorithm's model: its adapter, or client `client`'s where each client has its own."""
    from silotune.algorithms import ALGORITHMS  # registering every algorithm is its import

    summary = json.loads(RunFolder(result).summary.read_text(encoding="utf-8"))
    algorithm = str(summary["algorithm"])
    folders = sorted(p.parent for p in RunFolder(result).adapters.glob("*/adapter_config.json"))
    if not folders:
        raise UserError(f"{RunFolder(result).adapters} holds no PEFT adapter; is the run finished?")
    own = [f for f in folders if _CLIENT_ADAPTER.match(f.name)]
    name = algorithm
    if own:  # one model per client (LocIT, split): the chosen client's
        wanted = [f for f in own if f.name == client_name(client)]
        if not wanted:
            raise UserError(
                f"{algorithm} has no adapter for {client_name(client)} in {folders[0].parent}; "
                f"pick one of {', '.join(f.name for f in own)} with --client N"
            )
        folders, name = wanted, f"{algorithm}/{client_name(client)}"
    adapters = tuple(folders)
    if ALGORITHMS.get(algorithm).adapters > 1:  # FedPIT infers with global + its private one
        private = client_adapter_dir(RunFolder(root).clients / client_name(client), PRIVATE)
        if not (private / "adapter_config.json").is_file():
            raise UserError(
                f"{algorithm}'s private adapter of {client_name(client)} is missing: expected a "
                f"PEFT folder at {private}; pick another client with --client N"
            )
        adapters, name = (*adapters, private), f"{algorithm}/{client_name(client)}"
    return Candidate(name, adapters, summary.get("communication"))


def resolve_tasks(specs: list[str]) -> Tasks:
    """Group names, lm-eval task names and paths to task YAML files or folders, resolved."""
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]

    names: list[str] = []
    paths: list[Path] = []
    groups: list[str] = []
    named = False
    for spec in (s.strip() for s in specs if s.strip()):
        path = Path(spec).expanduser()
        if spec in TASK_GROUPS:
            groups.append(spec)
            names += TASK_GROUPS[spec]
            named = True
        elif path.exists():
            folder = path if path.is_dir() else path.parent
            index = TaskManager(include_path=str(folder), include_defaults=False).task_index
            # A file names its own tasks; a folder every task its YAML files define.
            found = [n for n, e in index.items() if path.is_dir() or e.yaml_path == path.resolve()]
            if not found:
                raise UserError(f"{path} defines no lm-eval task (no `task:` in its YAML)")
            paths.append(folder)
            names += sorted(found)
        else:
            names.append(spec)
            named = True
    if not names:
        raise UserError("--tasks is empty: give " + _known())
    return Tasks(tuple(dict.fromkeys(names)), tuple(dict.fromkeys(paths)), tuple(groups), named)


def _known() -> str:
    return (
        f"a group ({', '.join(TASK_GROUPS)}), an lm-eval task name (see `lm-eval ls tasks`) "
        "or the path of a task YAML file or folder"
    )


def task_manager(tasks: Tasks) -> Any:
    """lm-eval's TaskManager over its own tasks (only when one is named) and the given folders."""
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's thousands of task YAMLs takes seconds: skip it for path-only tasks.
    manager = TaskManager(
        include_path=[str(p) for p in tasks.include_paths] or None,
        include_defaults=tasks.needs_defaults,
    )
    unknown = [n for n in tasks.names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task {', '.join(unknown)}: give " + _known())
    return manager


def load_candidate(config: Config, candidate: Candidate) -> tuple[Any, Any]:
    """The base model as silotune loads it, with the candidate's adapters applied, and its
    tokenizer."""
    from peft import PeftModel

    from silotune.modeling.load import load_model, load_tokenizer, resolve_model
    from silotune.modeling.placement import resolve_placement

    source = resolve_model(config.model)
    model: Any = load_model(source, resolve_placement(config))
    names = [f"adapter-{i}" for i in range(len(candidate.adapters))]
    for i, (name, folder) in enumerate(zip(names, candidate.adapters, strict=True)):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name)
    if len(names) > 1:
        # PeftModel.set_adapter takes one name; the tuner underneath takes several.
        model.base_model.set_adapter(names)
    model.eval()
    return model, load_tokenizer(source)


def score(
    model: Any, tokenizer: Any, tasks: Tasks, manager: Any, limit: int | None, batch_size: int
) -> dict[str, Any]:
    """lm-eval's results for one model: per task, each metric and its standard error."""
    import lm_eval  # type: ignore[import-untyped]
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-untyped]

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks.names),
            task_manager=manager,
            limit=limit,
            log_samples=False,
        )
    except OSError as exc:  # ConnectionError included: a task's data is not on this machine
        raise UserError(
            f"lm-eval could not load a task's data ({str(exc).strip().splitlines()[0]}); lm-eval's "
            "own tasks download it from the Hugging Face hub: run where the hub is reachable "
            "(or its datasets cache is filled), or pass task YAML files over local data"
        ) from None
    results: dict[str, Any] = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k: (v if isinstance(v, int | float) else None)
            for k, v in metrics.items()
            if "," in k  # lm-eval names scores `metric,filter`; the rest are labels
        }
        results[task]["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
    return results


def evaluate_folder(
    target: Path,
    tasks: list[str],
    *,
    client: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    log: Log = print,
) -> Path:
    """Score TARGET's models and the base model on `tasks`; returns the written lm-eval.json."""
    target = target.expanduser().resolve()
    if not target.is_dir():
        raise UserError(f"{target} is not a folder; pass a run, result or adapter folder")
    config_file = find_config(target)
    root = config_file.parent
    candidates = [Candidate("base", ()), *find_candidates(target, root, client)]
    resolved = resolve_tasks(tasks)
    manager = task_manager(resolved)
    config = load_config(config_file, algorithm_checks=False)
    models: dict[str, Any] = {}
    for candidate in candidates:
        log(f"lm-eval: scoring {candidate.name} on {', '.join(resolved.names)}")
        model, tokenizer = load_candidate(config, candidate)
        models[candidate.name] = {
            "adapters": [_label(a, root) for a in candidate.adapters],
            "communication_gb": candidate.communication_gb,
            "results": score(model, tokenizer, resolved, manager, limit, batch_size),
        }
        del model  # the next candidate loads the base model afresh
    data = {
        "lm_eval_version": version("lm-eval"),
        "model": config.model.name,
        "tasks": list(resolved.names),
        "client": client,
        "limit": limit,
        "models": models,
        "references": {g: REFERENCES[g] for g in resolved.groups if g in REFERENCES},
    }
    folder = target / "eval"
    folder.mkdir(exist_ok=True)
    write_json(folder / "lm-eval.json", data)
    write_atomic(folder / "lm-eval.md", markdown(data).encode("utf-8"))
    _link_from_report(target)
    log(f"lm-eval scores in {folder / 'lm-eval.md'}")
    return folder / "lm-eval.json"


def _link_from_report(target: Path) -> None:
    """Add one line to TARGET's report.md (if it has one) pointing to the lm-eval section."""
    report = RunFolder(target).report
    if not report.is_file():
        return
    text = report.read_text(encoding="utf-8")
    if _REPORT_LINK not in text:
        write_atomic(report, (text.rstrip("\n") + f"\n\n{_REPORT_LINK}\n").encode("utf-8"))


def markdown(data: dict[str, Any]) -> str:
    """The lm-eval section: one row per task metric, one column per model, ± lm-eval's stderr."""
    names = list(data["models"])
    lines = [
        "# Standard benchmarks (lm-eval)",
        "",
        f"lm-eval {data['lm_eval_version']} on {data['model']}; per-client models are "
        f"{client_name(data['client'])}'s"
        + (f"; at most {data['limit']} records per task" if data["limit"] else "")
        + ". Each score ± lm-eval's standard error.",
        "",
        "| task | metric | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for task, metric in _metrics(data):
        cells = [_cell(data["models"][n]["results"].get(task, {}), metric) for n in names]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    comm = [data["models"][n]["communication_gb"] for n in names]
    lines.append("| communication (GB) | up + down | " + " | ".join(_gb(c) for c in comm) + " |")
    for group, ref in data["references"].items():
        lines += [
            "",
            f"Published {group} figures (accuracy %, not run here; source: {ref['source']}):",
        ]
        lines += ["", "| model | comm. (GB) | average | " + " | ".join(ref["columns"]) + " |"]
        lines.append("|---|---|---|" + "---|" * len(ref["columns"]))
        for row in ref["rows"]:
            scores = " | ".join(f"{s:.2f}" for s in row["scores"])
            lines.append(
                f"| {row['model']} | {row['communication_gb']:.1f} | {row['average']:.2f} "
                f"| {scores} |"
            )
    return "\n".join(lines) + "\n"


def _metrics(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for model in data["models"].values():
        for task, metrics in model["results"].items():
            for key in metrics:
                if "," in key and "_stderr," not in key:
                    seen[(task, key)] = None
    return iter(sorted(seen))


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    name, _, filt = key.partition(",")
    stderr = metrics.get(f"{name}_stderr,{filt}")
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def _gb(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"
