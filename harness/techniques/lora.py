"""lora: PEFT LoRA adapters on a frozen base model."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from harness.techniques import BuildContext, Stage, dataclass_args, technique

_RESERVED = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
             "revision", "inference_mode")


@technique("lora", stage=Stage.MODEL, order=10,
           args=dataclass_args(LoraConfig, reserved=_RESERVED,
                               shown=("r", "lora_alpha", "lora_dropout", "target_modules")))
def lora(ctx: BuildContext, **args) -> None:
    """Only the adapters train: grads and AdamW state shrink to the adapters' (well under 1 % of
    the base for r=16 on q/v), parameters barely change. Activations do not shrink: the frozen
    base still saves what backward needs to reach the adapters.
    """
    ctx.model = get_peft_model(ctx.model, LoraConfig(task_type="CAUSAL_LM", **args))
    config = ctx.model.peft_config["default"]
    ctx.resolved["lora"] = {"target_modules": sorted(config.target_modules)}
