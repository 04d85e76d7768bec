"""chunked_nll: the LM head and the loss over chunks of tokens, never the full logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.techniques import (
    BuildContext,
    Stage,
    TechniqueArgError,
    Unsupported,
    base_model,
    technique,
)

if TYPE_CHECKING:  # imported on use: the registry (tables, `ls`) is read without torch
    import torch

IMPLS = ("harness", "trl")


def _resolve(args: dict) -> dict:
    merged = {"chunk_size": 256, "impl": "harness", **args}
    for key in args:
        if key not in ("chunk_size", "impl"):
            raise TechniqueArgError(f"unknown argument {key!r}; chunked_nll takes chunk_size, impl",
                                    key=str(key))
    size = merged["chunk_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise TechniqueArgError(f"must be a positive integer, got {size!r}", key="chunk_size")
    if merged["impl"] not in IMPLS:
        raise TechniqueArgError(f"must be one of {', '.join(IMPLS)}, got {merged['impl']!r}",
                                key="impl")
    if merged["impl"] == "trl" and "chunk_size" in args:
        raise TechniqueArgError("impl: trl tiles by TRL's own private constants; chunk_size "
                                "applies to impl: harness only", key="chunk_size")
    return merged


def _chunk_nll_sum(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module):
    import torch.nn.functional as F

    # fp32 logits, as transformers' own loss up-casts them; only this chunk's exist at once.
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int) -> torch.Tensor:
    """The causal-LM loss of `model(input_ids, labels=labels).loss`, computed chunk by chunk.

    The decoder runs once; then, per chunk of `chunk_size` next-token positions, the LM head and
    cross-entropy run under non-reentrant checkpointing, so forward keeps no chunk's logits and
    backward recomputes them one chunk at a time: the `[tokens, vocab]` fp32 logits (and their
    gradient) never exist whole — at most one `[chunk_size, vocab]` block does.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    base = base_model(model)
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    hidden = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    count = (targets != -100).sum().clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_nll_sum, hidden[start:end], targets[start:end], head,
                                   use_reentrant=False)
    return total / count


def _estimate(stack: dict, args: dict) -> None:
    from harness.estimate import NotModelled

    if args["impl"] != "harness":
        raise NotModelled("chunked_nll impl: trl (TRL's fused head) is not modelled")
    stack["chunk"] = args["chunk_size"]


@technique("chunked_nll", stage=Stage.MODEL, args=_resolve, estimate=_estimate)
def chunked_nll(ctx: BuildContext, chunk_size: int, impl: str) -> None:
    """The loss never materialises the full `[tokens, vocab]` fp32 logits: the peak loses about
    2 × tokens × vocab × 4 bytes (logits and their gradient) and gains one chunk's worth — the
    saving that matters most for large vocabularies and long sequences.

    impl: harness — chunks of `chunk_size` tokens (256 by default, as the PEFT memory guide and
    TRL's original chunked NLL had it), each recomputed in backward. impl: trl — TRL's fused LM
    head, what SFTTrainer runs today (tiles of vocabulary columns; see TRL's add_fused_lm_head).
    """
    if impl == "trl":
        try:
            from trl.trainer.utils import add_fused_lm_head
        except ImportError as e:
            raise Unsupported(f"the installed trl has no fused LM head: {e}") from None
        add_fused_lm_head(base_model(ctx.model))  # before PEFT wraps the model, as SFTTrainer does
        ctx.loss_fn = lambda model, batch: model(**batch, use_cache=False, fused_lm_head=True).loss
        return
    ctx.loss_fn = lambda model, batch: chunked_causal_lm_loss(
        model, batch["input_ids"], batch["labels"], chunk_size)
