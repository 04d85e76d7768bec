"""trainable_tokens: PEFT's trainable tokens — only chosen rows of the embedding train."""

from __future__ import annotations

from harness.techniques import BuildContext, Stage, TechniqueArgError, dataclass_args, technique
from harness.techniques.lora import _RESERVED, _peft

_CONFIG = dataclass_args(lambda: _peft().TrainableTokensConfig, reserved=_RESERVED,
                         defaults={"target_modules": ["embed_tokens"]},
                         shown=("token_indices", "target_modules"))


def _resolve(args: dict) -> dict:
    indices = args.get("token_indices")
    if not isinstance(indices, list) or not indices or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise TechniqueArgError("needs token_indices: a non-empty list of token ids",
                                key="token_indices")
    return _CONFIG(args)


def _check_ids(model, args: dict) -> str | None:
    vocab = model.get_input_embeddings().num_embeddings
    if max(args["token_indices"]) >= vocab:  # negative ids: refused with the arguments
        return f"token_indices must be ids in [0, {vocab}), the vocabulary size {vocab}"
    return None


@technique("trainable_tokens", stage=Stage.MODEL, adapters=True, conflicts=("lora", "qlora"),
           args=_resolve, check_model=_check_ids,
           not_estimated="trainable token rows are not modelled")
def trainable_tokens(ctx: BuildContext, **args) -> None:
    """Only the listed token ids' embedding rows train (PEFT keeps a small delta for them):
    grads and optimizer state for len(token_indices) × hidden values, instead of a whole
    trainable copy of the embedding (`modules_to_save: [embed_tokens]`) with its vocab × hidden
    grads and AdamW state. With LoRA, spell it as LoRA does: `lora: {trainable_token_indices:
    {embed_tokens: [...]}}`.
    """
    peft = _peft()
    ctx.model = peft.get_peft_model(ctx.model, peft.TrainableTokensConfig(**args))
