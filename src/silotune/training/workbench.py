"""A base model with one LoRA adapter slot, used to train and evaluate many adapter states.

The frozen base is loaded once per process; every call swaps in the adapter state it is given,
so nothing one client trains stays in the model for the next (optimizer state is per call too).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from silotune.config import Config
from silotune.evaluation.evaluator import EvalResult, EvalSet, evaluate
from silotune.modeling.adapters import (
    GLOBAL,
    StateDict,
    add_lora,
    get_adapter,
    save_adapter,
    set_adapter,
)
from silotune.modeling.load import ModelSource, load_model, load_tokenizer
from silotune.training.loop import Examples, TrainResult, train_steps


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from any mix of ints and names (same on every machine)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Workbench:
    """Base model + tokenizer + the `global` LoRA adapter slot."""

    def __init__(self, source: ModelSource, config: Config) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(source)
        base = load_model(source)
        self.model = add_lora(base, config.lora, GLOBAL, seed=config.experiment.seed)
        self.initial: StateDict = get_adapter(self.model, GLOBAL)
        pad = self.tokenizer.pad_token_id
        assert isinstance(pad, int)
        self.pad_id = pad

    def train(
        self,
        state: StateDict,
        examples: Examples,
        steps: int,
        seed: int,
        proximal_mu: float = 0.0,
    ) -> tuple[StateDict, TrainResult]:
        """Train a copy of `state` for `steps` steps on `examples`; return the new state."""
        set_adapter(self.model, state, GLOBAL)
        result = train_steps(
            self.model,
            examples,
            self.config.train,
            steps,
            self.pad_id,
            seed,
            proximal_mu=proximal_mu,
        )
        return get_adapter(self.model, GLOBAL), result

    def evaluate(self, state: StateDict, eval_set: EvalSet) -> EvalResult:
        """Held-out metrics of the base model with adapter `state`."""
        set_adapter(self.model, state, GLOBAL)
        return evaluate(self.model, self.tokenizer, eval_set, self.config.eval)

    def evaluate_base(self, eval_set: EvalSet) -> EvalResult:
        """Held-out metrics of the base model alone (adapter disabled)."""
        with self.model.disable_adapter():
            return evaluate(self.model, self.tokenizer, eval_set, self.config.eval)

    def save(self, state: StateDict, target: Path) -> None:
        """Write `state` as a stock PEFT adapter folder."""
        save_adapter(self.model, state, target, GLOBAL)
