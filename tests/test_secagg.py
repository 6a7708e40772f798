"""Flower's SecAgg+ as a federated defence: config checks, the legacy-record translation on both
sides, and FedIT/FedPIT runs that aggregate through it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from safetensors.torch import load_file

from silotune.config import Config, load_config
from silotune.errors import ConfigError
from silotune.federated import secagg
from silotune.federated.metering import (
    ARRAYS,
    METRICS,
    RoundTraffic,
)
from silotune.federated.strategies import (
    build_strategy,
)
from silotune.records import adapter_to_record, record_to_adapter

ROOT = Path(__file__).resolve().parents[1]
STEP = 2 * secagg.CLIPPING_RANGE / secagg.QUANTIZATION_LEVELS  # one quantization level


def _template() -> dict[str, torch.Tensor]:
    return {"layer.lora_A.weight": torch.randn(2, 3), "layer.lora_B.weight": torch.randn(3, 2)}


def test_secagg_settings_are_checked() -> None:
    assert load_config(None).defence.secagg is False
    assert load_config(None, ["defence.secagg=true"]).defence.secagg is True
    with pytest.raises(ConfigError, match=r"defence\.secagg cannot be combined with defence\.dp"):
        load_config(None, ["defence.secagg=true", "defence.dp=client-fixed"])
    with pytest.raises(ConfigError, match=r"at least 2 clients.*partition\.clients = 1"):
        load_config(None, ["defence.secagg=true", "partition.clients=1"])
    with pytest.raises(ConfigError, match=r"federated\.fraction_train = 0\.5 gives 1"):
        load_config(None, ["defence.secagg=true", "federated.fraction_train=0.5"])


def test_legacy_arrays_map_back_to_adapter_names_and_dtypes() -> None:
    template = {**_template(), "layer.half": torch.randn(4).to(torch.bfloat16)}
    arrays = secagg.to_ndarrays(template)
    assert [a.dtype.name for a in arrays] == ["float32"] * 3
    # The unmasked average comes back float64 and unnamed.
    back = secagg.from_ndarrays([a.astype("float64") for a in arrays], template)
    assert list(back) == list(template)
    for key, tensor in template.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor)
    with pytest.raises(ValueError, match="expected shape"):
        secagg.from_ndarrays(list(reversed(arrays)), template)


@pytest.mark.usefixtures("flower_task")
def test_client_mod_hands_our_layout_in_and_legacy_fitres_out() -> None:
    template = _template()
    fitins = FitIns(ndarrays_to_parameters(secagg.to_ndarrays(template)), {"server-round": 2})
    msg = Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    upload = {k: v + 1.0 for k, v in template.items()}

    def handler(message: Message, _: Context) -> Message:
        received = record_to_adapter(message.content.array_records[ARRAYS])
        assert list(received) == list(template)
        assert all(torch.equal(received[k], template[k]) for k in template)
        assert message.content.config_records["config"]["server-round"] == 2
        metrics = MetricRecord({"num-examples": 5, "train_loss": 0.25})
        content = RecordDict({ARRAYS: adapter_to_record(upload), METRICS: metrics})
        return Message(content, reply_to=message)

    translate = secagg.client_mods(lambda: template)[1]
    reply = translate(msg, context, handler)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == 5 and fitres.metrics["train_loss"] == 0.25
    sent = secagg.from_ndarrays(parameters_to_ndarrays(fitres.parameters), template)
    assert all(torch.equal(sent[k], upload[k]) for k in upload)


@pytest.mark.parametrize(
    ("name", "legacy"),
    [("fedavg", "_MeteredLegacy"), ("fedprox", "_MeteredLegacy"), ("fedadam", "_SecAggFedAdam")],
)
def test_legacy_strategy_follows_the_configured_one(name: str, legacy: str) -> None:
    config = load_config(ROOT / "configs" / "tiny.toml", [f"federated.strategy={name}"])
    strategy = build_strategy(config.federated, 3)
    strategy.traffic = {}
    plan = secagg.SecAggPlan(strategy, config, 3, _template(), 24.0, lambda r, a: None)
    built: Any = secagg.legacy_strategy(plan)
    assert type(built).__name__ == legacy and built.traffic is strategy.traffic
    assert built.min_fit_clients == 3 and built.fraction_evaluate == 0.0
    mu = config.federated.proximal_mu if name == "fedprox" else 0.0
    assert built.on_fit_config_fn(4) == {"server-round": 4, "proximal-mu": mu}
    if name == "fedadam":
        assert built.eta == config.federated.server_lr and built.tau == 1e-3
    # aggregate_fit gets the unmasked average in every result: it passes it on, keeps metrics.
    strategy.traffic[1] = RoundTraffic(started=0.0, bytes_down=0, tensor_bytes_down=0)
    average = secagg.to_ndarrays(plan.initial)
    results = [
        (None, FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(average), n, {"client": c}))
        for c, n in enumerate((10, 30))
    ]
    params, _ = built.aggregate_fit(1, results, [])
    assert strategy.traffic[1].clients == [{"client": 0}, {"client": 1}]
    if name != "fedadam":  # FedAdam then takes its server-side step from the average
        got = parameters_to_ndarrays(params)
        assert all(abs(g - a).max() < 1e-7 for g, a in zip(got, average, strict=True))


def test_weight_bound_and_report_note(tiny_config: Config) -> None:
    assert secagg.max_weight(tiny_config, "fedit", [24, 10, 17]) == 24.0
    assert secagg.max_weight(tiny_config, "fedpit", [24, 10, 17]) == tiny_config.synthetic.per_round
    note = secagg.describe(tiny_config, 3, 24.0)
    assert "SecAgg+" in note and "weighted sum" in note
    # Flower's ConfigRecord.count_bytes fails on an empty list; ours counts it as nothing.
    record = ConfigRecord({"dead": [], "ids": [1, 2]})
    assert secagg._record_bytes(record) == 16 + len("ids")


def _run(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    from rich.console import Console

    from silotune.runner import plan_experiment, run_experiment

    config = load_config(ROOT / "configs" / "tiny.toml", ["eval.generate=false", *overrides])
    return run_experiment(plan_experiment(config, tmp_path / name), Console(quiet=True))


def _rounds(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fedit_under_secagg_matches_plain_fedavg_within_quantization(tmp_path: Path) -> None:
    """One round, so both runs average the very same client uploads: the final adapters then
    differ only by SecAgg+'s quantization (later rounds would start from slightly different
    globals, which local Adam steps amplify)."""
    common = ['experiment.algorithms=["fedit"]', "train.rounds=1", "partition.clients=3"]
    secure = _run(tmp_path, "secagg", [*common, "defence.secagg=true"])
    plain = _run(tmp_path, "plain", [*common, "defence.secagg=false"])
    a = load_file(str(secure / "adapters" / "global" / "adapter_model.safetensors"))
    b = load_file(str(plain / "adapters" / "global" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    (log,) = _rounds(secure)
    weights = [c["num-examples"] for c in log["clients"]]
    bound = STEP * len(weights) * max(weights) / sum(weights)  # max_weight = the largest
    assert 0 < diff <= bound + 1e-7, (diff, bound)  # 0: the uploads really were quantized
    (plain_log,) = _rounds(plain)
    assert log["eval_loss"] == pytest.approx(plain_log["eval_loss"], rel=1e-4)
    # Keys, shares and masked (integer) uploads cost more than the plain float uploads.
    assert log["bytes_up"] > plain_log["bytes_up"] > 0 and log["tensor_bytes_up"] > 0
    assert "SecAgg+" in (secure / "report.md").read_text()
    assert "SecAgg+" not in (plain / "report.md").read_text()


@pytest.mark.slow
def test_fedpit_under_secagg_runs_rounds_and_client_evaluation(tmp_path: Path) -> None:
    """Two rounds (the protocol restarts each round), clients evaluating their private adapters
    through the Message API between SecAgg+ rounds."""
    out = _run(
        tmp_path,
        "fedpit",
        [
            'experiment.algorithms=["fedpit"]',
            "train.rounds=2",
            "defence.secagg=true",
            "synthetic.per_round=2",
            "synthetic.instruction_max_new_tokens=16",
            "synthetic.response_max_new_tokens=16",
        ],
    )
    logs = _rounds(out)
    assert [log["round"] for log in logs] == [1, 2]
    for log in logs:
        assert len(log["clients"]) == 3 and log["bytes_up"] > 0 and log["bytes_down"] > 0
        assert "global_eval_loss" in log and log["eval_loss"] > 0  # clients' own evaluation
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["per_client_final"]) == 3
    assert "SecAgg+" in (out / "report.md").read_text()
