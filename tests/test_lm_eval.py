"""`silotune eval`: lm-eval, offline, on custom YAML tasks over a few bundled records."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from silotune.config import Config, load_config
from silotune.errors import UserError
from silotune.evaluation.lm_eval import (
    TASK_GROUPS,
    evaluate_folder,
    resolve_tasks,
    task_manager,
)
from silotune.modeling.adapters import GLOBAL, PRIVATE, add_lora, get_adapter, save_adapter
from silotune.modeling.load import load_model, resolve_model
from silotune.run_folder import write_json

from .conftest import CONFIGS

_RECORDS = [
    ("Is fever a symptom of influenza?", 0),
    ("Is insulin used to treat a broken leg?", 1),
    ("Can antibiotics treat bacterial infections?", 0),
    ("Is the heart located in the foot?", 1),
    ("Does smoking raise the risk of lung cancer?", 0),
    ("Is water a strong poison in small amounts?", 1),
]
_MC = "silotune_test_yesno"
_ROLLING = "silotune_test_text"


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    """A folder with a multiple-choice task and a rolling-loglikelihood task over 6 records."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "records.jsonl"
    lines = [json.dumps({"question": q, "choices": ["yes", "no"], "label": y}) for q, y in _RECORDS]
    data.write_text("\n".join(lines) + "\n")
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    )
    (folder / "yesno.yaml").write_text(
        f"task: {_MC}\n{common}output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "text.yaml").write_text(
        f"task: {_ROLLING}\n{common}output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{question}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n"
    )
    return folder


def _tiny() -> Config:
    return load_config(CONFIGS / "tiny.toml", ["experiment.algorithms=['fedit', 'fedpit']"])


def _adapter(config: Config, target: Path, name: str, seed: int) -> None:
    """A LoRA adapter of the tiny model whose B is away from 0, so that it changes the model."""
    model = add_lora(load_model(resolve_model(config.model)), config.lora, name, seed=seed)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for key, param in model.named_parameters():
            if f".{name}." in key:
                param.normal_(0, 0.5)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(model, get_adapter(model, name), target, name)


def _fake_run(tmp_path: Path) -> Path:
    """A run folder with a FedIT and a FedPIT result, as `silotune run` lays them out."""
    config = _tiny()
    root = tmp_path / "run"
    root.mkdir()
    write_json(root / "config.json", config.to_dict())
    comm = {"bytes_up": 2_000_000, "bytes_down": 3_000_000}
    for algorithm, seed in (("fedit", 1), ("fedpit", 2)):
        (root / algorithm).mkdir()
        write_json(
            root / algorithm / "summary.json", {"algorithm": algorithm, "communication": comm}
        )
        _adapter(config, root / algorithm / "adapters" / GLOBAL, GLOBAL, seed)
    _adapter(config, root / "clients" / "client-0" / "adapters" / PRIVATE, PRIVATE, 3)
    (root / "fedit" / "report.md").write_text("# fedit\n")
    return root


def _scores(data: dict[str, Any], model: str, task: str) -> dict[str, Any]:
    results: dict[str, Any] = data["models"][model]["results"][task]
    return results


def test_a_fedit_adapter_and_a_fedpit_client_score_apart_from_base(
    tmp_path: Path, tasks: Path
) -> None:
    root = _fake_run(tmp_path)
    out = evaluate_folder(root, [str(tasks)], limit=None, batch_size=4, log=lambda _: None)
    assert out == root / "eval" / "lm-eval.json"
    data = json.loads(out.read_text())
    assert list(data["models"]) == ["base", "fedit", "fedpit/client-0"]
    assert data["models"]["fedpit/client-0"]["adapters"] == [
        "fedpit/adapters/global",
        "clients/client-0/adapters/private",
    ]
    base = _scores(data, "base", _ROLLING)["bits_per_byte,none"]
    fedit = _scores(data, "fedit", _ROLLING)["bits_per_byte,none"]
    fedpit = _scores(data, "fedpit/client-0", _ROLLING)["bits_per_byte,none"]
    assert len({base, fedit, fedpit}) == 3  # each adapter changes the model
    mc = _scores(data, "fedit", _MC)
    assert 0.0 <= mc["acc,none"] <= 1.0 and mc["acc_stderr,none"] > 0
    assert mc["samples"] == len(_RECORDS)
    assert data["models"]["fedit"]["communication_gb"] == pytest.approx(0.005)
    text = (root / "eval" / "lm-eval.md").read_text()
    assert "| communication (GB) | up + down | – | 0.005 | 0.005 |" in text
    assert f"| {_MC} | acc,none |" in text and " ± " in text


def test_fedpit_private_adapter_is_added_to_the_global_one(tmp_path: Path, tasks: Path) -> None:
    """Scoring the FedPIT result folder alone: global + private differs from global alone."""
    root = _fake_run(tmp_path)
    quiet = {"log": lambda _: None, "batch_size": 4}
    both = json.loads(
        evaluate_folder(root / "fedpit", [str(tasks / "text.yaml")], **quiet).read_text()
    )
    alone = evaluate_folder(
        root / "fedpit" / "adapters" / GLOBAL, [str(tasks / "text.yaml")], **quiet
    )
    single = json.loads(alone.read_text())
    assert list(single["models"]) == ["base", "fedpit/adapters/global"]
    assert list(both["models"]) == ["base", "fedpit/client-0"]
    assert set(both["tasks"]) == {_ROLLING}  # a file names its own task, not its siblings'
    key = "bits_per_byte,none"
    assert (
        _scores(both, "fedpit/client-0", _ROLLING)[key]
        != _scores(single, "fedpit/adapters/global", _ROLLING)[key]
    )


def test_a_missing_adapter_and_an_unknown_task_say_what_to_fix(tmp_path: Path, tasks: Path) -> None:
    root = _fake_run(tmp_path)
    with pytest.raises(UserError, match=r"private adapter of client-4 is missing.*--client"):
        evaluate_folder(root / "fedpit", [str(tasks)], client=4, log=lambda _: None)
    (root / "empty").mkdir()
    write_json(root / "empty" / "summary.json", {"algorithm": "fedit"})
    with pytest.raises(UserError, match="holds no PEFT adapter"):
        evaluate_folder(root / "empty", [str(tasks)], log=lambda _: None)
    with pytest.raises(UserError, match="not inside a silotune run"):
        evaluate_folder(tasks, [str(tasks)], log=lambda _: None)
    with pytest.raises(UserError, match=r"unknown lm-eval task no_such_task.*flowertune-medical"):
        task_manager(resolve_tasks(["no_such_task"]))


def test_every_named_group_is_a_task_of_the_installed_lm_eval() -> None:
    manager = task_manager(resolve_tasks(list(TASK_GROUPS)))
    assert {t for group in TASK_GROUPS.values() for t in group} <= set(manager.all_tasks)


def test_the_report_links_the_scores(tmp_path: Path, tasks: Path) -> None:
    root = _fake_run(tmp_path)
    evaluate_folder(root / "fedit", [str(tasks / "yesno.yaml")], log=lambda _: None)
    evaluate_folder(root / "fedit", [str(tasks / "yesno.yaml")], log=lambda _: None)
    report = (root / "fedit" / "report.md").read_text()
    assert report.count("[eval/lm-eval.md](eval/lm-eval.md)") == 1


@pytest.mark.slow
def test_silotune_eval_scores_real_fedit_fedpit_and_split_runs(tmp_path: Path, tasks: Path) -> None:
    from silotune.cli import main
    from silotune.runner import plan_experiment, run_experiment

    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['fedit', 'fedpit', 'split']",
            "partition.clients=2",
            "model.tiny_layers=3",  # split needs a middle block between front and back
            "train.rounds=1",
            "eval.generate=false",
            "synthetic.per_round=2",
            "synthetic.truncated='keep'",
        ],
    )
    run = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    assert main(["eval", str(run), "--tasks", str(tasks), "--client", "1", "--limit", "4"]) == 0
    data = json.loads((run / "eval" / "lm-eval.json").read_text())
    assert list(data["models"]) == ["base", "fedit", "fedpit/client-1", "split/client-1"]
    assert data["models"]["split/client-1"]["adapters"] == ["split/adapters/client-1"]
    scores = {m: _scores(data, m, _ROLLING)["bits_per_byte,none"] for m in data["models"]}
    assert len(set(scores.values())) == 4  # trained adapters move every model off the base
    for model in data["models"].values():
        assert model["results"][_MC]["samples"] == 4
        assert "acc_stderr,none" in model["results"][_MC]
    assert data["models"]["fedit"]["communication_gb"] > 0
    assert main(["eval", str(run), "--tasks", "no_such_task"]) == 2


def test_a_run_scores_its_lm_eval_tasks_when_it_finishes(tmp_path: Path, tasks: Path) -> None:
    from silotune.runner import plan_experiment, run_experiment

    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['cenit']",
            "train.rounds=1",
            "eval.generate=false",
            f"eval.lm_eval_tasks=['{tasks}']",
        ],
    )
    run = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    data = json.loads((run / "eval" / "lm-eval.json").read_text())
    assert list(data["models"]) == ["base", "cenit"]
    assert "acc_stderr,none" in data["models"]["cenit"]["results"][_MC]


def test_a_run_with_an_unknown_lm_eval_task_stops_before_training(tmp_path: Path) -> None:
    from silotune.runner import plan_experiment, run_experiment

    config = load_config(CONFIGS / "tiny.toml", ["eval.lm_eval_tasks=['no_such_task']"])
    with pytest.raises(UserError, match="unknown lm-eval task no_such_task"):
        run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.incomplete").exists()
