"""compile: the compiled step is measured, allocations inside compiled code included."""

from __future__ import annotations

import pytest

from tests.techniques.conftest import TOKENS, VOCAB

pytestmark = pytest.mark.slow  # both read the `bigvocab` run: `harness run` on CPU


def test_compile_fuses_the_fp32_loss_temporaries_away(bigvocab):
    """Eager up-casts the bf16 logits to fp32 and keeps the log-softmax beside them; inductor
    fuses up-cast, log-softmax and NLL into one kernel, so at least one fp32 [tokens, vocab]
    buffer that eager holds at its peak never exists."""
    eager = bigvocab["full-loss"]["memory"]
    compiled = bigvocab["compiled"]["memory"]
    assert eager["peak_allocated_bytes"] - compiled["peak_allocated_bytes"] > TOKENS * VOCAB * 4
    # Same parameters and AdamW state: the saving is in the step, not in what persists.
    assert compiled["end_of_step_bytes"]["optimizer"] == eager["end_of_step_bytes"]["optimizer"]


def test_allocations_inside_compiled_code_are_seen(bigvocab):
    """A dispatch-mode tracker sees every eager op, but not the buffers inductor's generated
    code allocates for itself; the CPU allocator trace does. In eager the two agree; compiled,
    the allocator's peak is higher by at least a bf16 [tokens, vocab] buffer, and those bytes
    show as `unattributed` (no tensor of ours was ever seen in them) rather than vanishing."""
    eager = bigvocab["full-loss"]["memory"]
    compiled = bigvocab["compiled"]["memory"]
    assert eager["tracked_tensor_peak_bytes"] == pytest.approx(eager["peak_allocated_bytes"],
                                                               rel=0.01)
    unseen = compiled["peak_allocated_bytes"] - compiled["tracked_tensor_peak_bytes"]
    assert unseen >= TOKENS * VOCAB * 2, unseen
    # Where the generated code holds that buffer depends on the kernels inductor picks for this CPU
    # (forward on one machine, backward on an AMX one): some phase's peak holds it, unattributed.
    assert max(phase["breakdown_bytes"]["unattributed"]
               for phase in compiled["phases"].values() if phase) >= TOKENS * VOCAB * 2

