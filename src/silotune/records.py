"""The only conversions between torch/PEFT adapter tensors and Flower records."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from silotune.modeling.adapters import StateDict


def adapter_to_record(state: StateDict) -> ArrayRecord:
    """Adapter tensors -> ArrayRecord (numpy serialisation, never pickle)."""
    return ArrayRecord(state)


def record_to_adapter(record: ArrayRecord) -> StateDict:
    """ArrayRecord -> adapter tensors (fresh CPU tensors that own their memory)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def tensor_bytes(record: ArrayRecord) -> int:
    """Bytes of raw tensor data in a record (without serialisation headers or key names)."""
    return sum(
        int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        for array in record.values()
    )


_STORE_PREFIX = "silotune."


def load_store(state: RecordDict) -> dict[str, StateDict]:
    """The adapters a client keeps in its own Context.state (never sent anywhere)."""
    return {
        key.removeprefix(_STORE_PREFIX): record_to_adapter(record)
        for key, record in state.array_records.items()
        if key.startswith(_STORE_PREFIX)
    }


def save_store(state: RecordDict, store: dict[str, StateDict]) -> None:
    """Write a client's adapters back into its Context.state."""
    for name, adapter in store.items():
        state[_STORE_PREFIX + name] = adapter_to_record(adapter)
