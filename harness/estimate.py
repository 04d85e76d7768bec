"""Closed-form estimate: the same phases, peaks and breakdown as a run, from arithmetic alone.

No tensor is created and no model is built: the shapes come from the model's config.json, the
technique stack says which tensors exist in which dtype, and each term is the bytes of tensors
that a decoder-only transformer (Llama, Mistral, Qwen2: GQA attention, SwiGLU MLP, RMSNorm)
keeps at each moment of a training step. Every term is a named line (`terms_bytes`), so an estimate can
be read — and compared with another method — one term at a time.

What autograd keeps per decoder layer follows from one rule: an op saves what its backward
needs for the gradients that are wanted. A frozen linear layer (LoRA's base) keeps nothing of its
input; a trainable one keeps its input; a PEFT adapter keeps its own fp32 copy of the input
(PEFT casts adapter inputs to the adapters' fp32); RMSNorm keeps an fp32 copy of its input.
Sizes are rounded to 512 bytes per tensor, as CUDA's allocator rounds.

What it does not model (`unsupported`, not guessed): each technique and optimizer says
whether it has an estimate and why not (techniques/, optimizers.py: autocast, compile, Liger,
int8, activation offload, trainable tokens, LoRA arguments other than rank, alpha, dropout and
targets, TRL's fused head, Adafactor); mixture-of-experts or other architectures,
sliding-window masks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.probes.timeline import CATEGORIES
from harness.record import Memory, Record, collect_env, new_record

ROUND = 512
ARCHITECTURES = ("llama", "mistral", "qwen2")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Adapter weights are fp32 whatever the base dtype (PEFT's autocast_adapter_dtype=True).
ADAPTER_BYTES = 4
# What PEFT targets when target_modules is not given (its per-architecture default).
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class NotModelled(Exception):
    """The estimate has no closed form for this stack or architecture: a result, with the reason."""


def _r(nbytes: float) -> int:
    """Bytes as CUDA's allocator hands them out: whole 512-byte blocks."""
    n = int(math.ceil(nbytes))
    return (n + ROUND - 1) // ROUND * ROUND if n > 0 else 0


@dataclass(frozen=True)
class Shapes:
    """What the arithmetic needs of a decoder-only config."""

    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    def linear(self, name: str) -> tuple[int, int]:
        """(in, out) features of one decoder-layer linear."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[name]

    def bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.qkv_bias
        return self.o_bias if name == "o_proj" else self.mlp_bias


def read_shapes(config_path: str) -> Shapes:
    """The shapes of a config.json (read as JSON: no transformers, no torch)."""
    with open(config_path) as f:
        c = json.load(f)
    arch = c.get("model_type")
    if arch not in ARCHITECTURES:
        raise NotModelled(f"model_type {arch!r}: the estimate knows {', '.join(ARCHITECTURES)}")
    if c.get("hidden_act", "silu") != "silu" or c.get("num_local_experts") or c.get("num_experts"):
        raise NotModelled("only dense SwiGLU (silu) decoder layers are modelled")
    if len(set(c.get("layer_types") or ["same"])) > 1:
        raise NotModelled("decoder layers of several kinds (layer_types) are not modelled")
    heads = c["num_attention_heads"]
    qwen = arch == "qwen2"
    window = c.get("sliding_window") if (not qwen or c.get("use_sliding_window")) else None
    return Shapes(
        arch=arch, hidden=c["hidden_size"], intermediate=c["intermediate_size"],
        layers=c["num_hidden_layers"], heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
        tied=bool(c.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias is all four.
        qkv_bias=True if qwen else bool(c.get("attention_bias")),
        o_bias=False if qwen else bool(c.get("attention_bias")),
        mlp_bias=bool(c.get("mlp_bias")), sliding_window=window)


# ---------------------------------------------------------------------------------------------
# The technique stack, as byte widths


@dataclass(frozen=True)
class Stack:
    weight_bytes: int  # non-quantized weights (and so the hidden states)
    trainable_base: bool  # full fine-tuning: every base weight trains
    targets: tuple[str, ...] = ()  # linears with a LoRA adapter
    rank: int = 0
    dropout: bool = False
    quantized: bool = False  # 4-bit base linears (bitsandbytes)
    double_quant: bool = False  # their absmax quantized again
    checkpointing: bool = False
    chunk: int | None = None  # chunked NLL: tokens per chunk
    attention: str = "sdpa"
    optimizer: str = "adamw"


def read_stack(uses: Iterable, train, attention: str) -> Stack:
    """The byte widths a variant's techniques imply, each technique adding its own part in the
    order they apply (techniques/: `estimate`); NotModelled for what has no closed form."""
    from harness.techniques import ordered

    pairs = ordered(tuple(uses))
    unmodelled = next((tech for tech, _ in pairs if tech.estimate is None), None)
    if unmodelled is not None:  # said before any other technique's or the model's reason
        raise NotModelled(f"{unmodelled.name}: {unmodelled.not_estimated}")
    if attention not in ("sdpa", "eager"):
        raise NotModelled(f"attn_implementation {attention}: the estimate knows sdpa and eager")
    stack: dict[str, Any] = {"weight_bytes": 4, "trainable_base": True, "checkpointing": False,
                             "attention": attention, "optimizer": train.optimizer}
    for tech, use in pairs:
        tech.estimate(stack, dict(use.args))
    return Stack(**stack)


# ---------------------------------------------------------------------------------------------
# Tensors that persist: parameters, gradients, optimizer state


@dataclass(frozen=True)
class Tensor:
    numel: int  # elements (a packed 4-bit weight: the weights it holds)
    nbytes: int  # allocated, rounded
    trainable: bool
    quantized: bool = False  # a 4-bit weight or its quantization state
    parameter: bool = True  # counted in params_total (quantization state is not)


def parameters(sh: Shapes, st: Stack) -> list[Tensor]:
    """Every parameter tensor (and 4-bit quantization state) the built model holds."""
    out: list[Tensor] = []

    def add(numel: int, itemsize: float, trainable: bool, quantized: bool = False,
            parameter: bool = True) -> None:
        out.append(Tensor(numel, _r(numel * itemsize), trainable, quantized, parameter))

    w, train = st.weight_bytes, st.trainable_base
    add(sh.vocab * sh.hidden, w, train)  # embed_tokens
    if not sh.tied:
        add(sh.vocab * sh.hidden, w, train)  # lm_head
    add(sh.hidden, w, train)  # final norm
    for _ in range(sh.layers):
        add(sh.hidden, w, train)
        add(sh.hidden, w, train)
        for name in LINEARS:
            fan_in, fan_out = sh.linear(name)
            n = fan_in * fan_out
            if not st.quantized:
                add(n, w, train)
            else:
                add(n, 0.5, False, True)  # two 4-bit codes per byte
                blocks = math.ceil(n / 64)
                if st.double_quant:
                    add(blocks, 1, False, True, False)  # absmax, itself 8-bit quantized
                    add(math.ceil(blocks / 256), 4, False, True, False)  # its fp32 absmax
                    add(256, 4, False, True, False)  # its code
                else:
                    add(blocks, 4, False, True, False)
                add(16, 4, False, True, False)  # the 4-bit code
            if sh.bias(name):
                add(fan_out, w, train)
            if name in st.targets:
                add(st.rank * fan_in, ADAPTER_BYTES, True)
                add(fan_out * st.rank, ADAPTER_BYTES, True)
    return out


def optimizer_state(trainable: list[Tensor], optimizer: str,
                    target: str = "cuda") -> tuple[int, int, int]:
    """(state bytes on the device, paged state bytes, step temporaries) for the trainable
    tensors, as the optimizer declares them (optimizers.py: `estimate`), for `target`."""
    from harness.optimizers import OPTIMIZERS

    spec = OPTIMIZERS[optimizer]
    if spec.estimate is None:
        raise NotModelled(f"optimizer {optimizer}: {spec.not_estimated}")
    return spec.estimate(trainable, target)


# ---------------------------------------------------------------------------------------------
# Activations: what autograd keeps, per decoder layer and for the head


def _inputs_kept(st: Stack, width: int, consumers: tuple[str, ...], stream: int,
                 shared: bool = False) -> float:
    """Bytes per token kept of one input (width features) read by `consumers` linears.
    shared: the input is already kept by another op (SDPA's output), so a trainable base
    keeps nothing more."""
    kept = 0.0
    if st.trainable_base and not shared:
        kept += stream * width  # one tensor, whichever linears read it
    adapted = [c for c in consumers if c in st.targets]
    for _ in adapted:
        if st.dropout:
            kept += width * (1 + ADAPTER_BYTES)  # dropout's mask, and its output for lora_A
        elif stream != ADAPTER_BYTES:
            kept += ADAPTER_BYTES * width  # each adapter's own fp32 copy of the input
        kept += ADAPTER_BYTES * st.rank  # lora_A's output, kept by lora_B
    if adapted and not st.dropout and stream == ADAPTER_BYTES and not st.trainable_base \
            and not shared:
        kept += stream * width  # the cast is a no-op: every adapter keeps the input itself
    return kept


def layer_terms(sh: Shapes, st: Stack, seq_len: int) -> dict[str, float]:
    """Bytes per token that one decoder layer keeps for backward, by part."""
    e, h, i = st.weight_bytes, sh.hidden, sh.intermediate
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    # RMSNorm: an fp32 copy of its input (or the fp32 input itself), 1/rms per token, and —
    # when its weight trains — the normalised input the weight multiplies.
    norm = 4 * h + 4 + (e * h if st.trainable_base else 0)
    terms = {"attention norm": norm,
             "q/k/v input": _inputs_kept(st, h, ("q_proj", "k_proj", "v_proj"), e)}
    if st.attention == "sdpa":
        # Flash / memory-efficient SDPA: q and k after RoPE, v, the output, fp32 logsumexp.
        terms["attention"] = e * (2 * q + 2 * kv) + 4 * sh.heads
        terms["o_proj input"] = _inputs_kept(st, q, ("o_proj",), e, shared=True)
    else:
        # Eager: q, k and v repeated to every head; over the whole [S, S] score matrix per
        # head, the fp32 softmax and (unless the model is fp32) its cast back to e.
        terms["attention"] = e * 3 * q
        terms["attention scores"] = 4 * sh.heads * seq_len
        terms["attention probabilities"] = e * sh.heads * seq_len if e != 4 else 0
        terms["o_proj input"] = _inputs_kept(st, q, ("o_proj",), e)
    terms["mlp norm"] = norm
    terms["gate/up input"] = _inputs_kept(st, h, ("gate_proj", "up_proj"), e)
    terms["mlp"] = 3 * e * i  # gate and up outputs, silu(gate)
    terms["down_proj input"] = _inputs_kept(st, i, ("down_proj",), e)
    return terms


@dataclass
class Estimate:
    params_total: int
    params_trainable: int
    terms: dict[str, int] = field(default_factory=dict)  # bytes of each named term
    memory: dict[str, Any] = field(default_factory=dict)


def flash_backward_scratch(batch: int, heads: int, kv_heads: int, seq_q: int, seq_k: int,
                           head_dim: int, itemsize: int) -> list[int]:
    """Bytes CUDA's flash-attention backward (FlashAttention-2's mha_bwd, SDPA's kernel for
    fp16/bf16) allocates beside its outputs: an fp32 softmax_d [B, H, S↑128], an fp32 dq
    accumulator [B, S↑128, H, D↑32 (↑64 above 128)], and for grouped-query attention dk and dv
    expanded to every query head [B, S_k, H, D]. Shared by the estimate and the simulation's
    CUDA target."""
    s_up = -(-seq_q // 128) * 128
    step = 32 if head_dim <= 128 else 64
    d_up = -(-head_dim // step) * step
    sizes = [4 * batch * heads * s_up, 4 * batch * s_up * heads * d_up]
    if kv_heads != heads:
        sizes += [itemsize * batch * seq_k * heads * head_dim] * 2
    return sizes


HOPPER_CUBLAS_WORKSPACE = 32 << 20  # PyTorch's default on sm90; other GPUs: 8 MiB + 128 KiB


def cublas_workspace_bytes() -> int:
    """Bytes PyTorch gives each cuBLAS handle as workspace, through the caching allocator, at
    the handle's first matmul (at::cuda::getChosenWorkspaceSize): the `:SIZE_KIB:COUNT` pairs
    of CUBLAS_WORKSPACE_CONFIG summed, else Hopper's default — the larger of the defaults, so a
    prediction errs towards needing more. A training step has two handles: the loop's thread
    (forward, optimizer) and autograd's backward thread, each with its own. Shared by the
    estimate and the simulation's CUDA target."""
    pairs = re.findall(r":([0-9]+):([0-9]+)", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    return HOPPER_CUBLAS_WORKSPACE


def estimate(sh: Shapes, st: Stack, batch_size: int, seq_len: int, warmup_steps: int,
             steps: int, target: str = "cuda", accumulation: int = 1) -> Estimate:
    """Phase peaks and breakdowns of a training step, in closed form. With `accumulation`
    micro-batches per step, the later ones' forward and backward run with every grad held."""
    if sh.sliding_window is not None and seq_len > sh.sliding_window:
        raise NotModelled(f"seq_len {seq_len} > sliding_window {sh.sliding_window}: the "
                          "sliding-window mask is not modelled")
    T = batch_size * seq_len
    e, h, i, V, L = st.weight_bytes, sh.hidden, sh.intermediate, sh.vocab, sh.layers
    if target == "cuda" and st.attention == "sdpa" and e == 4 and sh.kv_heads != sh.heads:
        # fp32 attention with grouped key/value heads has no fused CUDA kernel (flash is half
        # precision only, and only flash takes grouped heads): SDPA runs its math path, which
        # keeps what eager attention keeps (as the simulation's fake CUDA device runs it).
        st = dataclasses.replace(st, attention="eager")
    tensors = parameters(sh, st)
    trainable = [t for t in tensors if t.trainable]
    P = sum(t.nbytes for t in tensors)
    G = sum(t.nbytes for t in trainable)
    S_opt, paged, opt_temp = optimizer_state(trainable, st.optimizer, target)
    # clip_grad_norm_: one norm per gradient, their stack and the total.
    clip = ROUND * (len(trainable) + 2)

    per_layer = layer_terms(sh, st, seq_len)
    layer = sum(_r(b * T) for b in per_layer.values() if b)
    # Layer 0's input norm keeps nothing when the embedding is frozen (its input needs no grad).
    first_norm_skipped = 0 if st.trainable_base else _r(4 * h * T) + _r(4 * T)
    logits_bytes = e  # the LM head's output dtype
    head_norm = _r(4 * h * T) + _r(4 * T) + (_r(e * h * T) if st.trainable_base else 0)
    labels = _r(8 * T) + (_r(8 * T) if st.trainable_base else 0)  # + input ids, for the embedding
    if st.checkpointing:
        # Each checkpointed layer keeps only its input, the hidden state.
        layers_kept = L * _r(e * h * T)
    else:
        layers_kept = L * layer - first_norm_skipped
    if st.chunk is None:
        head_kept = head_norm + (_r(e * h * T) if st.trainable_base else 0) + _r(4 * V * T) + labels
        # End of forward: the logits (held by the output), their fp32 up-cast inside the loss.
        fwd_transient = _r(logits_bytes * V * T) + (_r(4 * V * T) if logits_bytes != 4 else 0)
        # Start of backward: the NLL's gradient and log-softmax's, both [tokens, vocab] fp32.
        loss_backward = 2 * _r(4 * V * T)
    else:
        c = min(st.chunk, T - batch_size)
        # The shifted hidden states, copied once; per chunk (recomputed in backward) its logits,
        # their fp32 up-cast and log-softmax's output, then the NLL's and log-softmax's fp32
        # gradients beside that output; the hidden states' gradient accumulates whole.
        kept_hidden = _r(e * h * (T - batch_size))
        head_kept = head_norm + kept_hidden + 2 * _r(8 * (T - batch_size))
        fwd_transient = _r(logits_bytes * V * c) + (_r(4 * V * c) if logits_bytes != 4 else 0) + \
            _r(4 * V * c)
        loss_backward = 3 * _r(4 * V * c) + kept_hidden
    A = layers_kept + head_kept

    # One layer's backward, relative to everything it kept. At its MLP product: the three
    # [T, i] gradients at once (of the product, then of silu's output and of up's), down_proj's
    # kept input already used and gone. Eager attention, at its softmax: the MLP's tensors and
    # the probabilities are used and gone, two fp32 [heads, S, S] gradients per sequence exist.
    def kept(*names: str) -> int:
        return sum(_r(per_layer.get(n, 0) * T) for n in names)

    layer_backward = 3 * _r(e * i * T) - kept("down_proj input")
    # CUDA runs flash attention for half-precision SDPA only (fp32 takes another kernel).
    workspace = sum(_r(n) for n in flash_backward_scratch(
        batch_size, sh.heads, sh.kv_heads, seq_len, seq_len, sh.head_dim, e)) \
        if target == "cuda" and st.attention == "sdpa" and e != 4 else 0
    if st.attention == "sdpa":
        # At SDPA's backward: the MLP's tensors and o_proj's input are used and gone; the
        # output's gradient, dq, dk and dv exist — and on CUDA the kernel's workspace.
        q = sh.heads * sh.head_dim
        at_sdpa = _r(e * q * T) * 2 + 2 * _r(e * sh.kv_heads * sh.head_dim * T) + workspace \
            - kept("mlp norm", "gate/up input", "mlp", "down_proj input", "o_proj input")
        layer_backward = max(layer_backward, at_sdpa)
    if st.attention == "eager":
        at_softmax = 2 * _r(4 * sh.heads * seq_len * T) - kept(
            "mlp norm", "gate/up input", "mlp", "down_proj input", "attention probabilities")
        layer_backward = max(layer_backward, at_softmax)
    # Backward: at its start (the loss's gradients); at the top layer (with checkpointing,
    # recomputed: its saved tensors are back); at its end (every grad).
    lm_head_grad = _r(e * V * h) if st.trainable_base and not sh.tied else 0
    candidates = {  # (activations, other, grads)
        "start": (A, loss_backward, 0),
        "top layer": (A - head_kept, layer_backward + (layer if st.checkpointing else 0),
                      lm_head_grad),
        # The bottom layer (full fine-tuning): every other grad exists, this layer's tensors
        # (recomputed, with checkpointing) and its backward's are still alive.
        "bottom layer": (layer if not st.checkpointing else _r(e * h * T),
                         layer_backward + (layer if st.checkpointing else 0),
                         G - _layer_grads(trainable, sh) - (_r(e * V * h) if st.trainable_base
                                                            else 0)),
        # The end: every grad. A tied embedding's gradient meets the LM head's, already there:
        # the new one and their sum exist at once.
        "end": (0, 2 * _r(e * V * h) if st.trainable_base and sh.tied else 0, G),
    }

    terms = {
        "parameters": P,
        "gradients": G,
        "optimizer state": S_opt,
        "activations: decoder layers": layers_kept,
        **{f"activations per layer: {k}": _r(b * T) for k, b in per_layer.items()
           if not st.checkpointing},
        "activations: head (norm, LM-head input, log-softmax, labels)": head_kept,
        "forward: logits and their fp32 up-cast": fwd_transient,
        "backward: loss gradients": loss_backward,
        ("backward: one layer (recomputed + MLP gradients)" if st.checkpointing else
         "backward: one layer's MLP gradients"): layer_backward + (layer if st.checkpointing else 0),
        "optimizer step temporaries": opt_temp + clip,
    }
    if workspace:  # fp32 softmax_d and dq accumulator; GQA's expanded dk, dv
        terms["backward: flash-attention workspace (CUDA)"] = workspace
    # cuBLAS: the loop thread's workspace from the first forward matmul on, autograd's backward
    # thread's from the first backward one; both then stay.
    blas = _r(cublas_workspace_bytes()) if target == "cuda" else 0
    if blas:
        terms["cuBLAS workspaces (CUDA: loop and backward threads, each)"] = blas
    if paged:
        terms["paged optimizer state (unified memory, not allocated)"] = paged

    def phase(params, grads, state, acts, other) -> dict[str, Any]:
        bd = {"params": params, "grads": grads, "optimizer": state, "activations": acts,
              "other": other}
        full = {k: bd.get(k, 0) for k in CATEGORIES}
        return {"peak_allocated_bytes": sum(full.values()), "peak_reserved_bytes": None,
                "breakdown_bytes": {**full, "unattributed": 0}}

    def step_phases(state: int) -> dict[str, dict]:
        before = 2 * blas if state else 0  # after a first step both workspaces exist
        held = accumulation > 1  # a later micro-batch's grads: all of them, added in place
        backward = max((phase(P, G if held else g, state, a, o + 2 * blas)
                        for a, o, g in candidates.values()),
                       key=lambda p: p["peak_allocated_bytes"])
        # Forward starts with the previous step's grads, until zero_grad(set_to_none=True).
        forward = max(phase(P, G if state else 0, state, 0, before),
                      phase(P, G if held else 0, state, A,
                            fwd_transient + (2 * blas if held else max(before, blas))),
                      key=lambda p: p["peak_allocated_bytes"])
        return {
            "forward": forward,
            "backward": backward,
            "optimizer": phase(P, G, S_opt, 0, opt_temp + clip + 2 * blas),
        }

    first, later = step_phases(0), step_phases(S_opt)
    phases = {"load": phase(P, 0, 0, 0, 0), **{k: max(first[k], later[k], key=lambda p:
                                                       p["peak_allocated_bytes"]) for k in later}}
    per_step = [max(p["peak_allocated_bytes"] for p in first.values())] + \
        [max(p["peak_allocated_bytes"] for p in later.values())] * (warmup_steps + steps - 1)
    peak_phase = max(phases, key=lambda k: phases[k]["peak_allocated_bytes"])
    memory = {
        "peak_allocated_bytes": phases[peak_phase]["peak_allocated_bytes"],
        "peak_reserved_bytes": None,
        "peak_phase": peak_phase,
        "peak_step": None if peak_phase == "load" else per_step.index(max(per_step)),
        "phases": phases,
        "per_step_peak_allocated_bytes": per_step,
        "breakdown_bytes": phases[peak_phase]["breakdown_bytes"],
        "breakdown_note": "estimated: closed-form terms, no tensor created",
        "end_of_step_bytes": None,
        "tracked_tensor_peak_bytes": None,
        "budget_bytes": None,
        "paged_optimizer_bytes": paged,
        "quantized_weight_bytes": sum(t.nbytes for t in tensors if t.quantized)
        if st.quantized else None,
        "terms_bytes": terms,
    }
    # As the record counts parameters: a 4-bit weight by the weights it holds.
    return Estimate(params_total=sum(t.numel for t in tensors if t.parameter),
                    params_trainable=sum(t.numel for t in trainable), terms=terms, memory=memory)


def _layer_grads(trainable: list[Tensor], sh: Shapes) -> int:
    """One decoder layer's share of the trainable bytes (the layers are alike)."""
    return sum(t.nbytes for t in trainable if t.numel < sh.vocab * sh.hidden) // sh.layers


# ---------------------------------------------------------------------------------------------
# As a record


def estimate_record(scenario, variant, run_id: str, steps: int | None = None,
                    target: str = "cuda") -> Record:
    """The variant's record with `method: estimated`: status ok with the closed-form phases,
    or unsupported with the reason the arithmetic does not cover it."""
    from harness.models import resolve_config

    train = variant.train if steps is None else dataclasses.replace(variant.train, steps=steps)
    variant = dataclasses.replace(variant, train=train)
    record = new_record(run_id=run_id, scenario=scenario, variant=variant, device="estimate",
                        method="estimated", index=scenario.index(variant), env=collect_env("cpu"))
    model = scenario.model_of(variant)
    source = resolve_config(model, scenario.path)
    try:
        if source.kind != "file":
            raise NotModelled("the config of a hub id not in the local cache cannot be read")
        for part in ("eval", "generate", "save", "data"):
            if getattr(variant, part) is not None:
                covers = "one fixed batch shape" if part == "data" else "the training step only"
                raise NotModelled(f"{part}: the closed form covers {covers}; simulate it "
                                  "(--device simulate)")
        if getattr(variant, "images", None) is not None:
            raise NotModelled("images: the closed form has no image encoder; simulate it "
                              "(--device simulate)")
        if getattr(variant, "objective", None) is not None:
            raise NotModelled(f"objective {variant.objective.name}: the closed form covers the "
                              "model's own loss; simulate it (--device simulate)")
        if variant.parallel is not None:
            raise NotModelled(f"{variant.parallel.label()}: the closed form has no sharding or "
                              "collective buffers; simulate it (--device simulate)")
        shapes = read_shapes(source.location)
        stack = read_stack(variant.techniques, train, model.attn_implementation)
        result = estimate(shapes, stack, train.batch_size, train.seq_len, train.warmup_steps,
                          train.steps, target, train.gradient_accumulation_steps)
    except NotModelled as e:
        record.status, record.error = "unsupported", f"not estimated: {e}"
        return record
    record.status, record.memory = "ok", Memory.of({**result.memory, "target": target})
    record.model.params_total = result.params_total
    record.model.params_trainable = result.params_trainable
    return record
