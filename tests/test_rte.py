"""RTE as a cloze task: templated instructions, mapped outputs, and choice accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from silotune.config import load_config
from silotune.config_reporting import EvalConfig
from silotune.config_sections import DataConfig, PartitionConfig
from silotune.data.load import load_records
from silotune.data.partition import split_dataset
from silotune.errors import ConfigError, DataError
from silotune.evaluation.evaluator import build_eval_set, choice_accuracy, evaluate
from silotune.modeling.tiny import build_tiny_tokenizer

TEMPLATE = '"{premise}" Question: {hypothesis}? yes/no'
RTE_TOML = """
[data]
path = "{path}"
instruction_template = '"{premise}" Question: {hypothesis}? yes/no'
output_field = "label"
output_map = ["entailment=yes", "not_entailment=no"]
label_field = "label"
max_length = 48
eval_size = 4

[partition]
clients = 2

[eval]
generate = false
choices = ["yes", "no"]
"""


def _write_rte(path: Path, n: int = 12, labels: tuple[str, ...] = ()) -> Path:
    labels = labels or ("entailment", "not_entailment")
    rows = [
        {
            "premise": f"The cat sat on mat number {i}.",
            "hypothesis": f"A cat sat on mat {i}",
            "label": labels[i % len(labels)],
            "idx": i,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rte_data(path: Path, **changes: object) -> DataConfig:
    fields: dict[str, object] = {
        "path": str(path),
        "instruction_template": TEMPLATE,
        "output_field": "label",
        "output_map": ("entailment=yes", "not_entailment=no"),
        "label_field": "label",
        "max_length": 48,
    }
    fields.update(changes)
    return DataConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return build_tiny_tokenizer()


def test_template_and_output_map(tmp_path: Path) -> None:
    loaded = load_records(_rte_data(_write_rte(tmp_path / "rte.jsonl")))
    ds = loaded.dataset
    assert set(ds.column_names) == {"instruction", "input", "output", "label"}
    assert (
        ds[0]["instruction"]
        == '"The cat sat on mat number 0." Question: A cat sat on mat 0? yes/no'
    )
    assert ds["output"][:4] == ["yes", "no", "yes", "no"]
    assert ds["label"][:2] == ["entailment", "not_entailment"]  # the source value, to skew on
    split = split_dataset(
        ds, _rte_data(tmp_path / "rte.jsonl", eval_size=4), PartitionConfig(method="iid"), 0
    )
    assert len(split.eval) == 4


def test_rte_toml_parses(tmp_path: Path) -> None:
    data = _write_rte(tmp_path / "rte.jsonl")
    toml = tmp_path / "rte.toml"
    toml.write_text(RTE_TOML.replace("{path}", str(data)), encoding="utf-8")
    cfg = load_config(toml)
    assert cfg.data.instruction_template == TEMPLATE
    assert cfg.data.output_mapping() == {"entailment": "yes", "not_entailment": "no"}
    assert cfg.eval.choices == ("yes", "no")
    assert load_records(cfg.data).dataset[1]["output"] == "no"


def test_template_missing_column_is_named(tmp_path: Path) -> None:
    cfg = _rte_data(_write_rte(tmp_path / "rte.jsonl"), instruction_template="{premise} {hypo}")
    with pytest.raises(DataError, match=r"'hypo'.*columns: premise, hypothesis, label, idx"):
        load_records(cfg)


def test_template_with_positional_field_is_rejected(tmp_path: Path) -> None:
    cfg = _rte_data(_write_rte(tmp_path / "rte.jsonl"), instruction_template="{} {premise}")
    with pytest.raises(DataError, match="positional field"):
        load_records(cfg)


def test_unmapped_output_value_is_named(tmp_path: Path) -> None:
    path = _write_rte(tmp_path / "rte.jsonl", labels=("entailment", "neutral", "not_entailment"))
    with pytest.raises(DataError, match=r"no entry for 1 value\(s\) of column 'label': 'neutral'"):
        load_records(_rte_data(path))


@pytest.mark.parametrize("entry", ["entailment", "=yes", "entailment="])
def test_malformed_output_map_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="source=target"):
        DataConfig(output_map=(entry,))
    with pytest.raises(ConfigError, match="twice"):
        DataConfig(output_map=("a=yes", "a=no"))


@pytest.mark.parametrize("choices", [("yes",), ("yes", "yes"), ("yes", " ")])
def test_bad_choices_are_a_config_error(choices: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match=r"eval\.choices"):
        EvalConfig(choices=choices)


class _Rigged(nn.Module):
    """Fixed next-token logits favouring `favoured` and EOS; records the widths it was fed."""

    def __init__(self, tok: PreTrainedTokenizerBase, favoured: str) -> None:
        super().__init__()
        bias = torch.zeros(len(tok))
        bias[tok(favoured, add_special_tokens=False)["input_ids"]] = 10.0
        bias[tok.eos_token_id] = 10.0
        self.register_buffer("bias", bias)
        self.widths: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.widths.append(input_ids.size(1))
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.bias.expand(b, t, -1))  # (b, t, v)


@pytest.mark.parametrize("favoured", ["yes", "no"])
def test_rigged_model_accuracy(tmp_path: Path, tok: PreTrainedTokenizerBase, favoured: str) -> None:
    data = _rte_data(_write_rte(tmp_path / "rte.jsonl"), max_length=24)
    other = "no" if favoured == "yes" else "yes"
    for wanted, expected in ((favoured, 1.0), (other, 0.0)):
        records = load_records(data).dataset.map(lambda r, w=wanted: {"output": w})
        eval_set = build_eval_set(records, tok, data)
        model = _Rigged(tok, favoured)
        assert choice_accuracy(model, tok, eval_set, ("yes", "no"), batch_size=5) == expected
        assert max(model.widths) <= 24  # prompts were cut to max_length, as in training
        assert len(model.widths) == 5  # 12 items x 2 choices in batches of 5


def test_reference_outside_choices_is_a_data_error(
    tmp_path: Path, tok: PreTrainedTokenizerBase
) -> None:
    data = _rte_data(_write_rte(tmp_path / "rte.jsonl"))
    eval_set = build_eval_set(load_records(data).dataset, tok, data)
    with pytest.raises(DataError, match=r"'no' are not among eval.choices \(yes, maybe\)"):
        choice_accuracy(_Rigged(tok, "yes"), tok, eval_set, ("yes", "maybe"), batch_size=4)


def test_tiny_llama_accuracy_is_reported_and_batch_independent(
    tmp_path: Path, tok: PreTrainedTokenizerBase
) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    data = _rte_data(_write_rte(tmp_path / "rte.jsonl"))
    eval_set = build_eval_set(load_records(data).dataset, tok, data)
    result = evaluate(model, tok, eval_set, EvalConfig(generate=False, choices=("yes", "no")))
    assert result.rouge_l is None
    assert result.metrics()["accuracy"] == result.accuracy
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0
    by_batch = {
        bs: choice_accuracy(model, tok, eval_set, ("yes", "no"), batch_size=bs) for bs in (1, 3, 24)
    }
    assert len(set(by_batch.values())) == 1, by_batch
    assert "accuracy" not in evaluate(model, tok, eval_set, EvalConfig(generate=False)).metrics()
