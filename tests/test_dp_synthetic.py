"""DP few-shot generation of FedPIT's instructions: the dealing's sensitivity, the noisy vote, the
accounting against an independent accountant, and a private FedPIT run's ledger."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, rdp
from rich.console import Console
from transformers import LogitsProcessorList

from silotune.config import load_config
from silotune.config_synthetic import SyntheticConfig
from silotune.data import dp_synthetic
from silotune.data.dp_synthetic import DPVote, check_budget, deal, generation_use
from silotune.data.generators import private_instructions
from silotune.data.synthetic import self_instruct_prompt
from silotune.errors import ConfigError
from silotune.modeling.adapters import GLOBAL
from silotune.modeling.generation import DecodeConfig, generate
from silotune.privacy.ledger import compose
from silotune.privacy.mechanisms import GaussianUse
from silotune.runner import plan_experiment, run_experiment
from silotune.seeds import derive_seed
from silotune.training.workbench import Workbench

from .conftest import CONFIGS


def test_one_record_changes_one_group() -> None:
    """The sensitivity argument: a record added to the data lands in at most one group, and
    every other group keeps exactly its records."""
    for seed in range(20):
        before = deal(30, 0.5, 4, 4, seed)
        after = deal(31, 0.5, 4, 4, seed)
        changed = [g for g in range(4) if before[g] != after[g]]
        assert len(changed) <= 1
        if changed:
            assert 30 in after[changed[0]]
        assert all(len(g) <= 4 for g in after)


def test_dealing_samples_at_the_rate() -> None:
    drawn = sum(len(g) for seed in range(200) for g in deal(100, 0.1, 4, 100, seed))
    assert drawn / (200 * 100) == pytest.approx(0.1, abs=0.01)


def _scores(rows: list[list[float]]) -> torch.FloatTensor:
    return torch.tensor(rows).log()  # type: ignore[return-value]


def test_the_vote_picks_the_groups_favourite_among_the_public_candidates() -> None:
    # Vocabulary of 4; the public prompt favours tokens 0 and 1 (top 2); both groups prefer 1
    # among those, although group 2's own favourite (3) is not a candidate.
    public = [0.5, 0.4, 0.05, 0.05]
    groups = [[0.3, 0.6, 0.05, 0.05], [0.05, 0.15, 0.1, 0.7]]
    vote = DPVote(groups=2, top_k=2, noise_std=0.0, seed=0)
    out = vote(torch.zeros(3, 1, dtype=torch.long), _scores([public, *groups]))  # type: ignore[arg-type]
    assert out.argmax(dim=1).tolist() == [1, 1, 1]
    assert torch.isinf(out).sum() == 3 * 3  # one possible token per row
    # Two blocks in one batch vote separately.
    two = vote(torch.zeros(6, 1, dtype=torch.long), _scores([public, *groups] * 2))  # type: ignore[arg-type]
    assert two.argmax(dim=1).tolist() == [1] * 6
    # Huge noise: the winner is a coin among the candidates, never outside them.
    noisy = DPVote(groups=2, top_k=2, noise_std=1e6, seed=0)
    picks = {
        int(noisy(torch.zeros(3, 1, dtype=torch.long), _scores([public, *groups])).argmax(1)[0])  # type: ignore[arg-type]
        for _ in range(40)
    }
    assert picks == {0, 1}


def test_the_accounting_matches_an_independent_accountant() -> None:
    """T tokens on one Poisson sample: the ledger's one Gaussian of sigma/sqrt(T), by Opacus,
    against Google's dp-accounting composing T Gaussians of sigma inside one sample."""
    syn = SyntheticConfig(dp=True, dp_noise_multiplier=20.0, instruction_max_new_tokens=16)
    use = generation_use(syn, rounds=3, records=64, delta=1e-4, accountant="rdp")
    assert use.sample_rate == 4 * 8 / 64 and use.steps == syn.per_round
    assert use.noise_multiplier == pytest.approx(20.0 / 4)
    ours = compose([use] * 3, 1e-4, "rdp")
    accountant = rdp.RdpAccountant()
    inner = dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(20.0)] * 16)
    # dp-accounting subsamples only a single Gaussian: check the joint identity without
    # subsampling, then the subsampled one-Gaussian form.
    alone = rdp.RdpAccountant()
    alone.compose(inner)
    single = rdp.RdpAccountant()
    single.compose(dp_event.GaussianDpEvent(use.noise_multiplier))
    assert alone.get_epsilon(1e-4) == pytest.approx(single.get_epsilon(1e-4), rel=1e-9)
    sampled = dp_event.PoissonSampledDpEvent(use.sample_rate, dp_event.GaussianDpEvent(5.0))
    accountant.compose(sampled, 3 * syn.per_round)
    assert ours == pytest.approx(accountant.get_epsilon(1e-4), rel=0.05)


@pytest.mark.filterwarnings("ignore:Optimal order")  # the loud plan's ε is far past the budget
def test_the_budget_is_reached_and_a_plan_past_it_is_refused() -> None:
    syn = SyntheticConfig(dp=True, dp_epsilon=4.0)
    use = check_budget(syn, rounds=3, records=40, delta=1 / 400, accountant="rdp")
    assert compose([use] * 3, 1 / 400, "rdp") == pytest.approx(4.0, rel=1e-2)
    loud = SyntheticConfig(dp=True, dp_epsilon=4.0, dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match=r"past synthetic\.dp_epsilon = 4"):
        check_budget(loud, rounds=3, records=40, delta=1 / 400, accountant="rdp")
    with pytest.raises(ConfigError, match=r"needs synthetic\.dp_epsilon"):
        SyntheticConfig(dp=True)


def test_with_negligible_noise_one_group_is_greedy_generation(tiny_bench: Workbench) -> None:
    """One group, every token a candidate, no noise to speak of: the private instruction is
    exactly greedy generation from that group's prompt."""
    tokenizer = tiny_bench.tokenizer
    vocab = int(tiny_bench.model.config.vocab_size)
    syn = SyntheticConfig(
        dp=True,
        dp_noise_multiplier=1e-12,
        dp_groups=1,
        dp_top_k=vocab,
        icl_examples=3,
        per_round=3,
        instruction_max_new_tokens=12,
        instruction_temperature=0.7,  # ignored: the vote is greedy
    )
    organs = ["liver", "heart", "lung", "skin", "bone", "eye", "ear", "blood", "brain", "gut"]
    local = [
        {"instruction": f"What treats a disease of the {organ}?", "input": "", "output": "x"}
        for organ in organs
    ]
    use = GaussianUse(syn.dp_noise_multiplier, 0.3, syn.per_round)
    # The random tiny model alone repeats one token whatever the prompt: a random adapter makes
    # its continuations depend on the prompt.
    gen = torch.Generator().manual_seed(0)
    noisy = {k: torch.randn(v.shape, generator=gen) for k, v in tiny_bench.initial.items()}
    tiny_bench.put(GLOBAL, noisy)
    tiny_bench.use([GLOBAL])
    try:
        private = private_instructions(tiny_bench.model, tokenizer, local, syn, 7, use)
        rate = dp_synthetic.sample_rate(syn, len(local))
        greedy = [_greedy(tiny_bench, local, rate, j) for j in range(syn.per_round)]
    finally:
        tiny_bench.put(GLOBAL, tiny_bench.initial)
    assert len({p.text for p in private}) > 1  # the prompts differ, and so do the instructions
    assert [p.text for p in private] == greedy


def _greedy(bench: Workbench, local: list[dict[str, str]], rate: float, j: int) -> str:
    dealt = deal(len(local), rate, 1, 3, derive_seed(7, "dp-deal", j))
    prompt = bench.tokenizer(self_instruct_prompt([local[i] for i in dealt[0]]))["input_ids"]
    decoding = DecodeConfig(max_new_tokens=12, stop=("### Task",))
    return generate(bench.model, bench.tokenizer, [prompt], decoding)[0].text


def test_a_vote_needs_whole_blocks(tiny_bench: Workbench) -> None:
    vote = DPVote(groups=2, top_k=3, noise_std=1.0, seed=0)
    with pytest.raises(ValueError, match="blocks of 3"):
        vote(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 5))  # type: ignore[arg-type]
    assert LogitsProcessorList([vote])  # a processor transformers' generate takes
    assert math.isclose(dp_synthetic.SENSITIVITY, math.sqrt(2))


@pytest.mark.slow
@pytest.mark.usefixtures("flower_task")
def test_a_private_fedpit_run_puts_the_generation_in_the_ledger(tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "tiny.toml",
        [
            "experiment.algorithms=['fedpit']",
            "train.rounds=2",
            "eval.generate=false",
            "synthetic.per_round=2",
            "synthetic.dp=true",
            "synthetic.dp_epsilon=8.0",
        ],
    )
    out = run_experiment(plan_experiment(config, tmp_path / "run"), Console(file=io.StringIO()))
    summary = json.loads((out / "summary.json").read_text())
    for client in summary["privacy"]["clients"].values():
        synthetic = client["mechanisms"]["synthetic"]
        assert synthetic["guarantee"] and synthetic["epsilon"] == pytest.approx(8.0, rel=1e-2)
        # The shared adapter is post-processing of the generation; what the client evaluates
        # with its private adapter and sends for the report has no guarantee.
        assert client["mechanisms"]["evaluation"]["guarantee"] is False
        assert client["epsilon"] == "inf"
    assert summary["synthetic"]["generated"] == 2 * 3 * 2
