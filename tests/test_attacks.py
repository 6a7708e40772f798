"""Privacy attacks: their metrics on crafted inputs, and that each succeeds where it must."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from silotune.attacks.extraction import compare, extraction_attack, probes, score, versus_base
from silotune.attacks.inversion import inversion_setting, record_tokens, score_recovery
from silotune.attacks.membership import membership_attack, roc_summary
from silotune.config import Config, config_from_dict
from silotune.config_federation import AttackConfig
from silotune.data.load import as_records, load_records
from silotune.data.sft import encode_prompt, tokenize_dataset
from silotune.evaluation.metrics import bleu4
from silotune.modeling.adapters import GLOBAL
from silotune.modeling.load import resolve_model
from silotune.split.segments import split_model
from silotune.training.loop import train_steps
from silotune.training.workbench import Workbench
from tests.conftest import CONFIGS


@pytest.fixture(scope="module")
def overfit_config(tiny_config: Config) -> Config:
    """The tiny model with a LoRA adapter on every projection, able to memorise a few records."""
    raw = tiny_config.to_dict()
    raw["lora"].update(
        r=16,
        alpha=32,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
    )
    raw["data"]["max_length"] = 48
    raw["train"].update(lr=1e-2, batch_size=4)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def records(tiny_config: Config) -> list[dict[str, str]]:
    return as_records(load_records(tiny_config.data).dataset)


def _overfit(config: Config, members: list[dict[str, str]], steps: int = 150) -> Workbench:
    bench = Workbench(resolve_model(config.model), config)
    examples = tokenize_dataset(members, bench.tokenizer, "alpaca", config.data.max_length)
    bench.use([GLOBAL], [GLOBAL])
    train_steps(bench.model, examples, config.train, steps, bench.pad_id, seed=0)
    bench.use([GLOBAL])
    return bench


# --- metrics on crafted inputs --------------------------------------------------------------


def test_extraction_scores_verbatim_and_unrelated_text(tiny_bench: Any) -> None:
    tok = tiny_bench.tokenizer
    same = score(["the cause is a gene change"], ["the cause is a gene change"], tok, 32, 0.5)
    assert same == {"rouge_l": [1.0], "prefix_match": [1.0], "extracted": [1.0]}
    other = score(["zebra quantum violin"], ["the cause is a gene change"], tok, 32, 0.5)
    assert other["rouge_l"] == [0.0] and other["prefix_match"] == [0.0]
    assert other["extracted"] == [0.0]
    # A continuation that starts right, then goes astray: a partial verbatim prefix.
    half = score(["the cause is zebra"], ["the cause is a gene change"], tok, 32, 0.9)
    assert 0.0 < half["prefix_match"][0] < 1.0 and half["extracted"] == [0.0]


def test_compare_reports_the_excess_over_non_members() -> None:
    members = {"rouge_l": [1.0, 0.8], "prefix_match": [1.0, 1.0], "extracted": [1.0, 1.0]}
    others = {"rouge_l": [0.2, 0.2], "prefix_match": [0.0, 0.0], "extracted": [0.0, 0.0]}
    out = compare(members, others)
    assert out["rouge_l"]["excess"] == pytest.approx(0.7)
    assert out["extracted"] == {"members": 1.0, "non_members": 0.0, "excess": 1.0, "ci95": 0.0}
    assert out["rouge_l"]["ci95"] > 0


def test_versus_base_pairs_records_and_cancels_what_the_base_already_did() -> None:
    def scores(members: list[float], others: list[float]) -> dict[str, Any]:
        side = lambda xs: {"rouge_l": xs, "prefix_match": xs, "extracted": xs}  # noqa: E731
        return {"scores": {"members": side(members), "non_members": side(others)}}

    # The base already scores members higher (e.g. easier records): tuning added nothing.
    base = scores([0.5, 0.6], [0.1, 0.2])
    same = versus_base(scores([0.5, 0.6], [0.1, 0.2]), base)
    assert same["rouge_l"] == {"excess": 0.0, "ci95": 0.0}
    # Tuning lifted members by 0.3 and non-members by 0.1: 0.2 is what it leaked.
    lifted = versus_base(scores([0.8, 0.9], [0.2, 0.3]), base)
    assert lifted["rouge_l"]["excess"] == pytest.approx(0.2)


def test_prefix_probe_gives_the_start_of_the_response_and_keeps_the_rest(
    tiny_bench: Any, tiny_config: Config
) -> None:
    tok = tiny_bench.tokenizer
    record = {"instruction": "What is x ?", "input": "", "output": "alpha beta gamma delta epsilon"}
    data = dataclasses.replace(tiny_config.data, max_length=256)  # nothing cut
    (instruction,) = probes([record], tok, data, "instruction", 0.5, 32)
    (prefix,) = probes([record], tok, data, "prefix", 0.5, 32)
    assert instruction.prompt == encode_prompt(tok, "alpaca", "What is x ?", "")
    assert instruction.reference.strip() == record["output"]
    assert prefix.prompt[: len(instruction.prompt)] == instruction.prompt
    given = tok.decode(prefix.prompt[len(instruction.prompt) :])
    assert (given + prefix.reference).strip() == record["output"]
    assert prefix.reference.strip() and given.strip()


def test_roc_summary_on_separated_and_identical_scores() -> None:
    separated = roc_summary([5.0, 6.0, 7.0], [1.0, 2.0, 3.0])
    assert separated["auc"] == 1.0 and separated["tpr_at_1pct_fpr"] == 1.0
    same = roc_summary([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert same["auc"] == 0.5
    reversed_ = roc_summary([1.0, 2.0], [5.0, 6.0])
    assert reversed_["auc"] == 0.0 and reversed_["tpr_at_1pct_fpr"] == 0.0


def test_recovery_scores_and_bleu(tiny_bench: Any) -> None:
    tok = tiny_bench.tokenizer
    ids = tok("the cause of the disease is a change in one gene", add_special_tokens=False)
    tokens = torch.tensor([ids["input_ids"]])
    real = torch.ones_like(tokens, dtype=torch.bool)
    mask = real.clone()
    mask[:, :2] = False  # a template head that is not scored
    from silotune.attacks.inversion import Observed

    victim = Observed(torch.zeros(1, tokens.shape[1], 4), tokens, real, mask)
    perfect = score_recovery(tokens.clone(), victim, tok)
    assert perfect["token_accuracy"] == 1.0 and perfect["bleu4"] == 1.0
    assert perfect["rouge1"] == 1.0
    wrong = tokens.clone()
    wrong[:, 2:] = tok.convert_tokens_to_ids("<unk>")
    assert score_recovery(wrong, victim, tok)["token_accuracy"] == 0.0
    assert bleu4(["a b c d e"], ["v w x y z"]) == 0.0


# --- the attacks succeed where a model does leak --------------------------------------------


def test_extraction_and_membership_succeed_on_an_overfit_model(
    overfit_config: Config, records: list[dict[str, str]]
) -> None:
    members, others = records[:4], records[200:204]
    bench = _overfit(overfit_config, members)
    cfg = AttackConfig(max_new_tokens=12)
    tuned = extraction_attack(
        bench.model, bench.tokenizer, members, others, overfit_config.data, cfg
    )
    assert tuned["instruction"]["prefix_match"]["members"] > 0.8
    assert tuned["instruction"]["prefix_match"]["excess"] > 0.7
    assert tuned["instruction"]["rouge_l"]["excess"] > 0.3
    with bench.model.disable_adapter():
        base = extraction_attack(
            bench.model, bench.tokenizer, members, others, overfit_config.data, cfg
        )
    assert abs(base["instruction"]["rouge_l"]["excess"]) < 0.1
    encode = lambda rs: tokenize_dataset(rs, bench.tokenizer, "alpaca", 48)  # noqa: E731
    found = membership_attack(
        bench.model, bench.model.disable_adapter, encode(members), encode(others), bench.pad_id
    )
    assert found["loss_ratio"]["auc"] == 1.0
    assert found["mean_loss"]["members"] < found["mean_loss"]["members_base"] - 1.0


def test_calibration_does_not_count_what_every_record_shares(
    overfit_config: Config, records: list[dict[str, str]]
) -> None:
    """Members and non-members share their answer: the model reproduces both, raw scores are
    high for members, and the excess over non-members is about zero."""
    answer = "Please talk to your doctor about this condition."
    members = [{**r, "output": answer} for r in records[:4]]
    others = [{**r, "output": answer} for r in records[200:204]]
    bench = _overfit(overfit_config, members)
    cfg = AttackConfig(max_new_tokens=12)
    found = extraction_attack(
        bench.model, bench.tokenizer, members, others, overfit_config.data, cfg
    )
    rouge = found["instruction"]["rouge_l"]
    assert rouge["members"] > 0.5 and rouge["non_members"] > 0.5
    assert abs(rouge["excess"]) < 0.15


def test_inversion_recovers_embeddings_and_noise_hurts_it(
    tiny_bench: Any, tiny_config: Config, records: list[dict[str, str]]
) -> None:
    tok = tiny_bench.tokenizer
    model = tiny_bench.model.get_base_model()
    tokens = [record_tokens(r, tok, tiny_config.data) for r in records[:60]]
    shadow, victim = tokens[:48], tokens[48:]
    front = split_model(model, 0, 1).front
    embeddings = model.get_input_embeddings().weight.detach()
    cfg = AttackConfig(inversion_steps=60)
    pad = tiny_bench.pad_id
    clean = inversion_setting(front, front, shadow, victim, tok, embeddings, 0.0, cfg, pad)
    noisy = inversion_setting(front, front, shadow, victim, tok, embeddings, 20.0, cfg, pad)
    assert clean["token_accuracy"] > 0.8 and clean["bleu4"] > 0.5
    assert noisy["token_accuracy"] < clean["token_accuracy"] - 0.3


@pytest.mark.parametrize("style", ["alpaca", "chat"])
def test_only_the_records_own_tokens_are_scored(
    tiny_bench: Any, tiny_config: Config, style: str
) -> None:
    tok = tiny_bench.tokenizer
    data = dataclasses.replace(tiny_config.data, prompt_style=style, max_length=256)
    record = {"instruction": "What causes gout ?", "input": "In adults.", "output": "Uric acid."}
    found = record_tokens(record, tok, data)
    assert len(found.scored) == len(found.ids)
    scored = tok.decode([i for i, s in zip(found.ids, found.scored, strict=True) if s])
    skipped = tok.decode([i for i, s in zip(found.ids, found.scored, strict=True) if not s])
    for part in ("What causes gout ?", "In adults.", "Uric acid."):
        assert part in scored.replace("  ", " ")
    assert "gout" not in skipped and "Uric" not in skipped
    assert len(skipped.split()) >= 2  # the template's words are left out
    # A prompt cut at its head (max_length) keeps the marks of the tokens it kept.
    cut = record_tokens(record, tok, dataclasses.replace(data, max_length=16))
    assert len(cut.scored) == len(cut.ids) <= 16 and any(cut.scored)


# --- run folders, the CLI and reports -------------------------------------------------------


@pytest.mark.slow
def test_attacks_run_after_training_and_again_from_the_cli(tmp_path: Path) -> None:
    from silotune.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "run",
            str(CONFIGS / "tiny.toml"),
            "--out",
            str(out),
            "--set",
            'experiment.algorithms=["fedit","split"]',
            "--set",
            "model.tiny_layers=4",
            "--set",
            "train.rounds=1",
            "--set",
            'attack.kinds=["membership","inversion"]',
            "--set",
            "attack.inversion_blocks=[0]",
            "--set",
            "attack.inversion_steps=20",
        ]
    )
    assert code == 0
    fedit = json.loads((out / "fedit" / "privacy.json").read_text())
    assert set(fedit) == {"membership"} and 0.0 <= fedit["membership"]["loss_ratio"]["auc"] <= 1
    split = json.loads((out / "split" / "privacy.json").read_text())
    settings = {(s["front_blocks"], s["noise"]) for s in split["inversion"]["settings"]}
    assert settings == {(0, 0.0), (1, 0.0)}  # asked for, and what this run's server saw
    assert [s["run_setting"] for s in split["inversion"]["settings"]] == [False, True]
    both = json.loads((out / "privacy.json").read_text())
    assert set(both) == {"fedit", "split"}
    # Attacking again adds to the results and replaces the report section, never duplicates it.
    assert main(["attack", "extraction", str(out / "fedit"), "--set", "attack.max_records=4"]) == 0
    fedit = json.loads((out / "fedit" / "privacy.json").read_text())
    assert set(fedit) == {"membership", "extraction"}
    assert fedit["extraction"]["members"] == 4 and fedit["extraction"]["non_members"] == 4
    report = (out / "fedit" / "report.md").read_text()
    assert report.count("<!-- privacy:begin -->") == 1
    assert "Training-data extraction" in report and "Membership inference" in report
    assert (out / "fedit" / "plots" / "membership_roc.png").is_file()
    # An attack that does not apply, and a folder that is no run, get one clear message.
    assert main(["attack", "inversion", str(out / "fedit")]) == 2
    assert main(["attack", "extraction", str(tmp_path)]) == 2
    assert main(["attack", "extraction", str(out), "--set", "train.rounds=2"]) == 2


def test_sweep_report_plots_utility_against_leakage(tmp_path: Path) -> None:
    from silotune.report.sweep import write_sweep_report

    variants = []
    for value, (loss, auc) in zip(("0", "1"), ((2.0, 0.9), (2.5, 0.6)), strict=True):
        folder = tmp_path / f"noise={value}"
        folder.mkdir()
        summary = {"algorithm": "fedit", "final": {"eval_loss": loss}}
        (folder / "summary.json").write_text(json.dumps(summary))
        membership = {"loss_ratio": {"auc": auc}}
        (folder / "privacy.json").write_text(json.dumps({"membership": membership}))
        variants.append((folder.name, value, folder))
    write_sweep_report(tmp_path, "defence.dp_noise_multiplier", variants)
    report = (tmp_path / "report.md").read_text()
    assert "membership AUC (ratio)" in report and "0.6" in report
    assert (tmp_path / "plots" / "tradeoff_membership_auc.png").is_file()
