"""Where and how the base model lives: device, dtype, quantization, gradient checkpointing.

`resolve_placement` turns the config's wishes (`model.device`, `model.dtype`,
`model.quantization`, `train.gradient_checkpointing`) into a `Placement` for this machine, and
refuses combinations the machine cannot run with a message naming the setting to change. The
defaults keep the CPU path exactly as it was: float32 on the CPU, nothing quantized.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from silotune.config import Config
from silotune.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    """A resolved placement for one process's copy of the base model."""

    device: torch.device
    dtype: torch.dtype  # of the frozen base's unquantized weights and its computation
    quantization: str  # "none" | "4bit" | "8bit"
    gradient_checkpointing: bool = False

    @property
    def on_cpu_fp32(self) -> bool:
        """The historical path: nothing to cast, move or quantize."""
        return self.device.type == "cpu" and self.dtype == torch.float32 and not self.quantized

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [str(self.device), dtype]
        if self.quantized:
            parts.append(f"{self.quantization} base")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        return ", ".join(parts)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """What `AutoModelForCausalLM.from_pretrained` needs to load the base like this."""
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.quantized:
            from transformers import BitsAndBytesConfig

            if self.quantization == "4bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=self.dtype,
                )
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                    load_in_8bit=True
                )
        if not self.on_cpu_fp32:
            kwargs["device_map"] = {"": self.device}
        return kwargs


def resolve_placement(config: Config) -> Placement:
    """The placement this machine gives `config`; impossible combinations raise ConfigError."""
    cfg = config.model
    device = _device(cfg.device)
    dtype = _dtype(cfg.dtype, device)
    if cfg.quantization != "none":
        _check_quantization(cfg.quantization, device)
    return Placement(device, dtype, cfg.quantization, config.train.gradient_checkpointing)


def planned_placement(config: Config, device: str) -> Placement:
    """The placement `config` would get on another machine's `device` (cpu or cuda), for
    planning: nothing about this machine is checked; "auto" dtype means bfloat16 on a GPU."""
    target = torch.device("cuda:0" if device == "cuda" else device)
    wanted = config.model.dtype
    dtype = _DTYPES.get(wanted, torch.bfloat16 if target.type == "cuda" else torch.float32)
    return Placement(target, dtype, config.model.quantization, config.train.gradient_checkpointing)


def _device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(wanted if wanted != "cuda" else "cuda:0")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.device = {wanted!r} but this machine has no CUDA GPU that torch can use "
                f"(torch {torch.__version__}); set model.device = 'auto' or 'cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"model.device = {wanted!r} but this machine has {count} CUDA GPU(s) "
                f"(cuda:0..cuda:{count - 1}); pick one of those"
            )
    return device


def _dtype(wanted: str, device: torch.device) -> torch.dtype:
    if wanted == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    dtype = _DTYPES[wanted]
    if (
        dtype == torch.bfloat16
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"model.dtype = 'bfloat16' but {name} ({device}) has no native bfloat16; set "
            "model.dtype = 'float32' (or 'auto'), or model.quantization = '4bit' to save memory"
        )
    return dtype


def _check_quantization(kind: str, device: torch.device) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization = {kind!r} needs the bitsandbytes package; install it with "
            "`pip install bitsandbytes` (or run `make setup`), or set model.quantization = 'none'"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"model.quantization = {kind!r} runs on CUDA GPUs and CPUs, not on {device}; set "
            "model.quantization = 'none' or model.device = 'cpu'"
        )


def prepare_for_training(model: nn.Module, placement: Placement) -> None:
    """Quantized bases get PEFT's k-bit preparation and keep a backward pass through their
    4-bit layers after inference; checkpointing is switched on if asked.

    Call it on the base model before adapters are injected.
    """
    if placement.quantized:
        from peft import prepare_model_for_kbit_training

        keep_4bit_differentiable(model)
        # Casts the few unquantized weights (norms, embeddings) to float32 for stable training
        # and makes the embeddings' output require grad, so checkpointed blocks get gradients.
        prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=placement.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif placement.gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(
                f"{type(model).__name__} cannot checkpoint gradients; set "
                "train.gradient_checkpointing = false"
            )
        # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings).
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_4bit_differentiable(model: nn.Module) -> None:
    """Keep every 4-bit layer of `model` on bitsandbytes' kernel that has a backward pass,
    in training and in inference alike."""
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight in place for
            # a fused CPU kernel at its first eval forward without grad, and keeps it repacked;
            # that kernel has no backward, so every later training step would leave the LoRA
            # gradients None (only PyTorch warns). `support_avx512bf16_for_cpu` is the layer's
            # own switch for that repack: off, evaluation and generation (FedPIT's
            # self-generation, split decoding) compute as on every other CPU and training after
            # them still reaches the adapters.
            module.support_avx512bf16_for_cpu = False


def device_of(module: nn.Module) -> torch.device:
    """Where `module`'s inputs should go: the device of its first parameter (CPU if none)."""
    for param in module.parameters():
        if not param.is_meta:
            return param.device
    return torch.device("cpu")
