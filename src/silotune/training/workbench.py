"""A base model with named LoRA adapter slots, used to train and evaluate many adapter states.

The frozen base is loaded once per process; every call swaps in the adapter states it is given,
so nothing one client trains stays in the model for the next (optimizer state is per call too).
Slots: `global` always; `private` (FedPIT's never-shared adapter) when asked for. A client that
trains a lower rank than the server's (lora.client_ranks) puts its `global` adapter into a slot of
its own rank, which `global` then names until another rank is put there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from silotune.config import Config
from silotune.evaluation.evaluator import EvalResult, EvalSet, evaluate, generates
from silotune.federated.lora_ranks import rank_of
from silotune.modeling.adapters import (
    GLOBAL,
    PRIVATE,
    StateDict,
    add_lora,
    add_named_lora,
    get_adapter,
    save_adapter,
    set_adapter,
    use_adapters,
)
from silotune.modeling.load import ModelSource, load_model, load_tokenizer
from silotune.modeling.placement import prepare_for_training, resolve_placement
from silotune.seeds import derive_seed
from silotune.training.loop import Examples, TrainResult, train_steps


class Workbench:
    """Base model + tokenizer + LoRA adapter slots."""

    def __init__(self, source: ModelSource, config: Config, private: bool = False) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(source)
        self.placement = resolve_placement(config)
        base = load_model(source, self.placement)
        prepare_for_training(base, self.placement)
        seed = config.experiment.seed
        self.model = add_lora(base, config.lora, GLOBAL, seed=seed)
        self._slots = {GLOBAL: GLOBAL}  # what each name means now: the PEFT adapter it is
        self._correction: str | None = None  # FedEx's frozen correction slot, if one is set
        self.initial: StateDict = get_adapter(self.model, GLOBAL)
        self.initial_private: StateDict = {}
        if private:
            self.add_private()
        use_adapters(self.model, [GLOBAL], [GLOBAL])
        self.description = source.description
        if not self.placement.on_cpu_fp32:
            self.description += f" on {self.placement.describe()}"
        self._fingerprint: str | None = None
        pad = self.tokenizer.pad_token_id
        assert isinstance(pad, int)
        self.pad_id = pad

    def fingerprint(self) -> str:
        """What server and clients must share: the base model's architecture and vocabulary,
        and the shared adapter's tensor names, shapes and initial values (hashed once)."""
        if self._fingerprint is None:
            self._fingerprint = self._hash_model()
        return self._fingerprint

    def _hash_model(self) -> str:
        architecture = self.model.config.to_dict()
        # Where and how each machine holds the base differs; the architecture must not.
        for local in ("_name_or_path", "transformers_version", "dtype", "quantization_config"):
            architecture.pop(local, None)
        digest = hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode())
        digest.update(str(len(self.tokenizer)).encode())
        for name in sorted(self.initial):
            tensor = self.initial[name]
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            # PEFT initialises adapters through the base's dtype: rounded to bfloat16, a base
            # held in float32 on one machine and bfloat16 on another gives the same values.
            rounded = tensor.detach().cpu().to(torch.bfloat16).view(torch.int16)
            digest.update(rounded.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def add_private(self) -> None:
        """Give the bench the private slot FedPIT clients have, unless it has one already."""
        if self.initial_private:
            return
        seed = derive_seed(self.config.experiment.seed, PRIVATE)
        add_named_lora(self.model, self.config.lora, PRIVATE, seed=seed)
        self.initial_private = get_adapter(self.model, PRIVATE)

    def put(self, name: str, state: StateDict) -> None:
        """Load `state` into slot `name` (`global` of a lower rank: into that rank's slot)."""
        if name == GLOBAL:
            rank = rank_of(_shapes(state))
            self._slots[GLOBAL] = (
                GLOBAL if rank == self.config.lora.r else self._rank_slot(GLOBAL, rank)
            )
        set_adapter(self.model, state, self._slot(name))

    def take(self, name: str) -> StateDict:
        """A copy of slot `name`'s current tensors."""
        return get_adapter(self.model, self._slot(name))

    def use(self, active: list[str], trainable: list[str] | None = None) -> None:
        """Choose the slots that take part in the forward pass (and those that train); a FedEx
        correction, frozen, takes part wherever `global` does."""
        slots = [self._slot(n) for n in active]
        if self._correction is not None and GLOBAL in active:
            slots.append(self._correction)
        use_adapters(self.model, slots, [self._slot(n) for n in trainable or []])

    def set_correction(self, state: StateDict) -> None:
        """FedEx: the frozen pairs that complete the global adapter to the exact mean of the
        clients' products (empty: none), in a slot of their rank, scaled as `global`."""
        old = self._correction
        self._correction = None
        if state:
            name = self._rank_slot("correction", rank_of(_shapes(state)))
            set_adapter(self.model, state, name)
            self._correction = name
        if old is not None and old != self._correction:
            self.model.base_model.set_adapter([GLOBAL])  # type: ignore[operator]  # not old
            self.model.base_model.delete_adapter(old)  # type: ignore[operator]

    def _slot(self, name: str) -> str:
        return self._slots.get(name, name)

    def _rank_slot(self, kind: str, rank: int) -> str:
        """The adapter `kind`-r`rank` (a lower-rank `global`, FedEx's correction): created on
        first use, scaled as the server's rank-lora.r adapter is."""
        name = f"{kind}-r{rank}"
        if name not in self.model.peft_config:
            add_named_lora(self.model, self.config.lora, name, rank=rank)
            self.model.train(self.model.training)  # its dropout as the rest: off in eval mode
        return name

    def fit(
        self,
        name: str,
        examples: Examples,
        steps: int,
        seed: int,
        active: list[str],
        proximal_mu: float = 0.0,
    ) -> TrainResult:
        """Train slot `name` in place; the other `active` slots take part but stay frozen."""
        self.use(active, [name])
        return train_steps(
            self.model,
            examples,
            self.config.train,
            steps,
            self.pad_id,
            seed,
            proximal_mu=proximal_mu,
            privacy=self.config.privacy,
        )

    def train(
        self,
        state: StateDict,
        examples: Examples,
        steps: int,
        seed: int,
        proximal_mu: float = 0.0,
    ) -> tuple[StateDict, TrainResult]:
        """Train a copy of `state` in the global slot alone; return the new state."""
        self.put(GLOBAL, state)
        result = self.fit(GLOBAL, examples, steps, seed, [GLOBAL], proximal_mu)
        return self.take(GLOBAL), result

    def evaluate(
        self,
        state: StateDict,
        eval_set: EvalSet,
        private: StateDict | None = None,
        round_: int | None = None,
        generate: bool = True,
    ) -> EvalResult:
        """Held-out metrics of base + `state` (+ a private adapter on top, as FedPIT infers),
        after round `round_` (which decides whether it generates; None: it does, unless
        `generate` is False)."""
        self.put(GLOBAL, state)
        if private is None:
            self.use([GLOBAL])
        else:
            self.put(PRIVATE, private)
            self.use([GLOBAL, PRIVATE])
        cfg = self.config
        now = generate and generates(cfg.eval, round_, cfg.train.rounds)
        return evaluate(self.model, self.tokenizer, eval_set, cfg.eval, generate_now=now)

    def evaluate_base(self, eval_set: EvalSet) -> EvalResult:
        """Held-out metrics of the base model alone (adapters disabled)."""
        with self.model.disable_adapter():
            return evaluate(self.model, self.tokenizer, eval_set, self.config.eval)

    def save(self, state: StateDict, target: Path) -> None:
        """Write `state` as a stock PEFT adapter folder."""
        self.put(GLOBAL, state)
        self.use([GLOBAL])
        save_adapter(self.model, state, target, self._slot(GLOBAL))


def _shapes(state: StateDict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}
