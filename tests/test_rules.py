"""What people reach for instead of measuring (harness/rules.py), answered for tiny-llama's
variants through accelerate's own functions and the guides' arithmetic — and how far each is
from what the step really holds."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import measured_variants

VARIANTS = [
    {"name": "full", "techniques": []},
    {"name": "amp", "techniques": ["amp_bf16"]},
    {"name": "lora", "techniques": ["bf16", {"lora": {"r": 8}}]},
    {"name": "qlora", "techniques": ["qlora"]},
]


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    """{name: (answers, the simulated step's Measured)} on an H200 and on a card of 40 MB."""
    from harness import gpus, rules
    from harness.models import resolve_config
    from harness.train import _unpacked_numel, build

    # The step's peak, simulated, for two of them.
    scenario, simulated = measured_variants(
        tmp_path_factory.mktemp("rules"), "rules", VARIANTS,
        train={"steps": 1, "warmup_steps": 0},
        modes=lambda name: (True,) if name in ("full", "lora") else ())
    source = resolve_config(scenario.model, scenario.path)
    small = gpus.Gpu(name="small", label="small", total_bytes=40 * 10**6, source="test",
                     cuda_total_bytes=40 * 10**6, context_bytes=0)
    out = {}
    for variant in scenario.variants:
        # The parameter counts a record has (a 4-bit weight counted unpacked, as train.py does).
        params = list(build(scenario.model, source, variant.techniques,
                            torch.device("meta")).model.parameters())
        reference = {"params_total": sum(map(_unpacked_numel, params)),
                     "params_trainable": sum(p.numel() for p in params if p.requires_grad),
                     "quantized_params": sum(_unpacked_numel(p) for p in params
                                             if getattr(p, "quant_state", None) is not None)}
        out[variant.name] = (rules.answers(scenario, variant, reference, gpus.card("h200")),
                             rules.answers(scenario, variant, reference, small),
                             simulated.get((variant.name, True)), reference)
    return out


def test_accelerate_answers_by_dtype_alone(answered):
    """`accelerate estimate-memory`'s training figure: four fp32 copies of the model in fp32,
    two under bf16 (mixed precision or not) — the same with LoRA as without, whatever the
    batch; none for 4-bit."""
    params = answered["full"][3]["params_total"]
    full, amp, lora, qlora = (answered[n][0]["accelerate"] for n in
                              ("full", "amp", "lora", "qlora"))
    assert full["peak_allocated_bytes"] == pytest.approx(16 * params, rel=1e-4)  # + buffers
    assert amp["peak_allocated_bytes"] == lora["peak_allocated_bytes"] == \
        pytest.approx(8 * params, rel=1e-4)
    assert qlora["status"] == "unsupported" and "int4" in qlora["error"]


def test_the_guides_rule_counts_weights_and_moments_only(answered):
    """Weights in their dtype plus 8 bytes of AdamW state per trainable parameter: below every
    simulated peak, which also holds gradients, activations and the logits."""
    params = answered["full"][3]["params_total"]
    assert answered["full"][0]["guide"]["peak_allocated_bytes"] == 12 * params
    assert answered["amp"][0]["guide"]["peak_allocated_bytes"] == 12 * params  # fp32 weights
    lora = answered["lora"][3]
    assert answered["lora"][0]["guide"]["peak_allocated_bytes"] == \
        2 * lora["params_total"] + 8 * lora["params_trainable"]
    qlora = answered["qlora"][3]  # 4-bit weights at half a byte, the rest in bf16
    assert answered["qlora"][0]["guide"]["peak_allocated_bytes"] == \
        2 * (qlora["params_total"] - qlora["quantized_params"]) + \
        qlora["quantized_params"] // 2 + 8 * qlora["params_trainable"]
    for name in ("full", "lora"):
        big, _, got, _ = answered[name]
        assert big["guide"]["peak_allocated_bytes"] < got.memory["peak_allocated_bytes"], name


def test_the_device_map_answers_whether_the_weights_load(answered):
    """infer_auto_device_map on an H200 puts everything on the GPU; on 40 MB the fp32 model's
    weights (19.5 MB) still load, though the step needs five times that — the question it
    answers is not the one asked."""
    for name, (big, small, _, _) in answered.items():
        assert big["device_map"]["text"] == "h200: all on the GPU", name
        assert small["device_map"]["text"] == "small: all on the GPU", name
    assert answered["full"][2].memory["peak_allocated_bytes"] > 2 * 40 * 10**6
