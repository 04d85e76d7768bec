"""Optimizers by name (the scenario's `train.optimizer`): how much state each keeps.

Paged optimizers (bitsandbytes) keep their state in CUDA unified memory, which PyTorch's
allocator never sees: `paged_state_bytes` counts it from the state tensors themselves so the
record can show it beside `max_memory_allocated` instead of silently dropping it.

Each optimizer declares what it can do as a technique does (techniques/__init__.py): why it
cannot be simulated (`not_simulated`), its closed-form state (`estimate`, or `not_estimated`
with the reason).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.techniques import Unsupported

if TYPE_CHECKING:  # imported where used: naming an optimizer (validation, tables) needs no torch
    import torch


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    make: Callable[[list, Any], torch.optim.Optimizer]  # (params, TrainSpec) → optimizer
    doc: str
    not_simulated: str | None = None  # why its step cannot run on fake tensors
    # The estimate's trainable tensors (estimate.Tensor: numel, nbytes) and target → (state
    # bytes on the device, paged state bytes, step temporaries), as the library lays its state
    # out. None: not modelled, for the reason in `not_estimated`.
    estimate: Callable[[list, str], tuple[int, int, int]] | None = None
    not_estimated: str | None = None
    # Made from the model itself (PEFT's LoRA optimizers read its adapters): `make` takes the
    # model as a third argument, and the variant must train LoRA adapters.
    needs_lora: bool = False

    def __post_init__(self):
        if (self.estimate is None) == (self.not_estimated is None):
            raise RuntimeError(f"optimizer {self.name!r}: give its estimate or why it has none")


def _adamw_state(foreach: bool):
    def estimate(trainable, target="cuda"):
        from harness.estimate import ROUND

        # Two moments and a step count; the count is a CPU scalar on CUDA unless the kernel is
        # fused (or capturable): no device bytes there.
        step = ROUND if target != "cuda" or not foreach else 0
        state = sum(2 * t.nbytes + step for t in trainable)
        # foreach AdamW: torch._foreach_sqrt(exp_avg_sqs) is one moment-sized temporary.
        return state, 0, sum(t.nbytes for t in trainable) if foreach else 0

    return estimate


def _bnb_32bit_state(trainable, target="cuda"):
    from harness.estimate import _r as rounded

    # bitsandbytes: two fp32 moments per element whatever the weight dtype, step in place.
    return sum(2 * rounded(t.numel * 4) for t in trainable), 0, 0


def _bnb_8bit_state(paged: bool):
    def estimate(trainable, target="cuda"):
        from harness.estimate import _r as rounded

        # bitsandbytes: 8-bit moments with an fp32 absmax per 256-element block; tensors under
        # 4096 elements keep 32-bit moments. Its step works in place.
        state = sum(2 * (rounded(t.numel) + rounded(math.ceil(t.numel / 256) * 4)) if t.numel >= 4096
                    else 2 * rounded(t.numel * 4) for t in trainable)
        return (0, state, 0) if paged else (state, 0, 0)

    return estimate


def _adamw(params, train):
    import torch

    # foreach=True is what CUDA picks by default; CPU would pick the for-loop form, whose step
    # temporaries are far smaller. The same choice on every device keeps runs comparable.
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, foreach=True)


def _adamw_fused(params, train):
    import torch

    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)


def _sgd(params, train):
    import torch

    return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay, foreach=True)


def _adafactor(params, train):
    from transformers.optimization import Adafactor

    # As transformers' Trainer sets it up for optim="adafactor": a fixed learning rate.
    return Adafactor(params, lr=train.lr, weight_decay=train.weight_decay,
                     scale_parameter=False, relative_step=False, warmup_init=False)


def _bnb(cls_name: str):
    def make(params, train):
        try:
            import bitsandbytes as bnb
        except Exception as e:  # noqa: BLE001 - a missing or broken native library
            raise Unsupported(f"bitsandbytes cannot be imported here: {e}") from None
        # bitsandbytes computes its quantile maps from constants with .tolist(), which a fake
        # mode (simulation) refuses: they are built as real tensors, as any run has them.
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            return getattr(bnb.optim, cls_name)(params, lr=train.lr,
                                                weight_decay=train.weight_decay)

    return make


def _lorafa(params, train, model):
    from peft.optimizers import create_lorafa_optimizer

    config = model.peft_config["default"]  # LoRA's: validation asks for it (needs_lora)
    return create_lorafa_optimizer(model, r=config.r, lora_alpha=config.lora_alpha, lr=train.lr,
                                   weight_decay=train.weight_decay)


# LoRA+'s ratio of B's learning rate to A's, as its paper and PEFT's docs suggest: memory does
# not depend on it.
LORAPLUS_LR_RATIO = 16


def _loraplus(params, train, model):
    import torch
    from peft.optimizers import create_loraplus_optimizer

    # The AdamW the adamw optimizer is (foreach), with LoRA+'s parameter groups.
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=train.lr,
                                     loraplus_lr_ratio=LORAPLUS_LR_RATIO,
                                     weight_decay=train.weight_decay, foreach=True)


_PAGED_NOT_SIMULATED = ("paged state lives in CUDA unified memory, outside the allocator, "
                        "which fake CPU tensors cannot stand for (adamw_8bit has the same state "
                        "bytes, on the device)")

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("adamw", _adamw, "torch AdamW, foreach: two fp32-or-param-dtype moments per "
                  "parameter (2× the trainable bytes), plus foreach step temporaries",
                  estimate=_adamw_state(foreach=True)),
    OptimizerSpec("adamw_fused", _adamw_fused, "torch AdamW, fused kernel: the same state, "
                  "without foreach's per-step temporaries", estimate=_adamw_state(foreach=False)),
    OptimizerSpec("sgd", _sgd, "torch SGD without momentum: no state at all",
                  estimate=lambda trainable, target="cuda": (0, 0, 0)),
    OptimizerSpec("adafactor", _adafactor, "transformers Adafactor: factored second moment "
                  "(row + column vectors per matrix), no first moment: state ≈ O(rows + cols)",
                  not_estimated="Adafactor's factored state needs each tensor's shape"),
    OptimizerSpec("adamw_32bit", _bnb("AdamW32bit"), "bitsandbytes AdamW32bit: fp32 moments "
                  "whatever the parameter dtype (fp16/bf16 weights with fp32 state: 8 bytes per "
                  "trainable parameter), updated in place", estimate=_bnb_32bit_state),
    OptimizerSpec("adamw_8bit", _bnb("AdamW8bit"), "bitsandbytes AdamW8bit: both moments in "
                  "block-wise 8-bit (≈ ¼ of fp32 AdamW's state) plus small absmax tables",
                  estimate=_bnb_8bit_state(paged=False)),
    OptimizerSpec("paged_adamw_8bit", _bnb("PagedAdamW8bit"), "bitsandbytes PagedAdamW8bit: 8-bit "
                  "state in CUDA unified memory, paged to CPU under pressure; invisible to "
                  "PyTorch's allocator (counted separately)", _PAGED_NOT_SIMULATED,
                  estimate=_bnb_8bit_state(paged=True)),
    OptimizerSpec("lorafa", _lorafa, "PEFT's LoRA-FA (create_lorafa_optimizer): lora_A frozen "
                  "at its initialisation, only lora_B trains, its gradient projected: state and "
                  "grads for B alone, and no input to A saved for A's gradient",
                  not_estimated="LoRA-FA's frozen lora_A is not modelled", needs_lora=True),
    OptimizerSpec("loraplus", _loraplus, "PEFT's LoRA+ (create_loraplus_optimizer): AdamW with "
                  f"lora_B at {LORAPLUS_LR_RATIO}× lora_A's learning rate — the same state as "
                  "adamw", estimate=_adamw_state(foreach=True), needs_lora=True),
)}


def make_optimizer(name: str, params: list, train, model=None) -> torch.optim.Optimizer:
    spec = OPTIMIZERS[name]
    return spec.make(params, train, model) if spec.needs_lora else spec.make(params, train)


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    import torch

    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state living in bitsandbytes' paged (unified) memory."""
    return sum(t.numel() * t.element_size() for t in state_tensors(optimizer)
               if getattr(t, "is_paged", False))
