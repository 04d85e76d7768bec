"""Simulation probe: the same step on fake tensors — nothing allocated, full-size models in seconds.

The model is built on the meta device (techniques applied there: dtype, adapters, checkpointing),
then materialised as fake CPU tensors (`FakeTensorMode`): every op runs its shape/dtype logic
and no kernel. The tracker (tracker.py) sees every tensor storage an op creates and when its
last reference dies; with CUDA's 512-byte rounding those births and deaths are the allocation
trace that `timeline.analyse` turns into phase peaks and a breakdown, exactly as for a real run.

What fake CPU tensors do as CUDA would: SDPA dispatches to the flash kernel (saves output +
logsumexp, never a [B, H, S, S] matrix); AdamW is foreach, as on CUDA. What no op output shows
— memory CUDA kernels and libraries allocate beside their outputs — the CUDA target adds where
it is modelled (flash attention's backward workspace, cuBLAS handles' workspaces; see docs/simulation.md).
Reserved memory comes from replaying the trace through a model of CUDA's caching allocator; a
deep model's trace is assembled from three simulated layers (layers.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
import warnings
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake, unset_fake_temporarily
from torch.utils._pytree import tree_leaves

from harness.estimate import cublas_workspace_bytes, flash_backward_scratch
from harness.patches import (
    SteppingScaler,
    compiled_code_traced,
    cuda_attention,
    real_tensors_lifted,
    unpacked_batches,
    unpadded_masks,
)
from harness.probes import Kind, Probe
from harness.probes.allocator import replay
from harness.probes.layers import (
    DEPTH,
    NotAssembled,
    assemble,
    decoder_layers,
    label_layers,
    own_layers,
)
from harness.probes.timeline import Phase, analyse, build_blocks, peak_within
from harness.probes.tracker import NOT_ANSWERED


class SimulateProbe(Probe):
    method = "simulated"
    traces_allocations = True  # the tracker's storage births and deaths are the trace

    def __init__(self, device: torch.device, budget_bytes: int | None = None,
                 target: str = "cuda", card=None):
        super().__init__(device, budget_bytes)
        self.target = target  # cuda: add what CUDA kernels allocate that CPU ones do not
        self.extra["target"] = target
        # On the fake CUDA device (fake_cuda.py): the simulated card the libraries are told of.
        self.card = card
        if device.type == "cuda" and card is None:
            raise ValueError("a simulation on the fake CUDA device needs its card")
        if target == "cuda":
            self.tracker.scratch = self._cuda_scratch
        self.tracker.values = functools.partial(library_values, liger=device.type == "cuda",
                                                known=self.known)
        self.tracker.kernels = device_kernels
        if device.type == "cuda":
            self.tracker.device_type = "cuda"
        # cuBLAS handles' workspaces (CUDA target): one for the loop's thread, one for autograd's
        # backward thread; made at each one's first matmul, kept for the run.
        self._workspaces: dict[str, torch.Tensor] = {}
        self._phase_name: str | None = None
        # Label the trace by decoder layer, to assemble a deeper model's from it (layers.py):
        # then `labelled` is (allocations, labels, owners, phases), or the reason it is not.
        # With `assemble_to` too, `assembly()` is then (memory section, trace) of a model that
        # many layers deep, from the assembled trace — or raises why it could not be.
        self.label_layers = False
        # What a label is (models.Units): a decoder layer, or a period of several.
        self.units = None
        self.labelled: tuple | str | None = None
        self.assemble_to: int | None = None
        self._assembled_at: tuple | NotAssembled | None = None
        self._model = None
        self._hooks: list = []
        self.attention: dict[str, int] | None = None  # fake CUDA: SDPA calls by kernel

    def _start_device(self) -> None:
        self._device_modes = contextlib.ExitStack()
        if self.device.type == "cuda":
            from harness import fake_cuda

            self._device_modes.enter_context(fake_cuda.device(self.card))
        self._fake = FakeTensorMode(allow_non_fake_inputs=True)
        self._copies: list[torch.Tensor] = []
        self._lifted: dict[int, tuple] = {}  # packed 4-bit host tensors → their fake device
        self._device_modes.enter_context(self._fake)
        self._device_modes.enter_context(unpacked_batches())
        self._device_modes.enter_context(unpadded_masks(self.known))
        self._device_modes.enter_context(compiled_code_traced(self.card))
        if self.device.type == "cuda":
            _lift_on_backward_thread(self.device)
            self._device_modes.enter_context(real_tensors_lifted(self._lifted))
            self.attention = {}
            self._device_modes.enter_context(cuda_attention(self.card.capability,
                                                            self.attention))

    def sight(self, kind, tensors) -> None:
        # A real tensor (the packed 4-bit weights, see _materialize) enters ops as the fake
        # mode's memoised fake copy: name that copy (the tracker counts only fake storage) and
        # keep it alive, or the memo forgets it and each op would see a new copy.
        leaves = []
        for t in tree_leaves(tensors):
            t = getattr(t, "_local_tensor", t)  # a DTensor: its rank's shard
            if isinstance(t, torch.Tensor) and not is_fake(t):
                t = self._fake.from_tensor(t)
                self._copies.append(t)
            leaves.append(t)
        self.tracker.sight(kind, leaves)

    def on_host(self):
        return unset_fake_temporarily()

    def follow_values(self) -> None:
        from harness.probes.values import KnownValues

        self.tracker.known_values = KnownValues()
        self._device_modes.enter_context(self.tracker.known_values.tensors_from_lists())

    def saving(self):
        """Fake tensors hold no bytes to write: see `unwritten_files`. The host holds nothing
        of the model either: no resident memory is sampled."""
        return unwritten_files()

    def grad_scaler(self) -> torch.amp.GradScaler:
        warnings.warn("simulated: GradScaler takes every step, as when no gradient overflowed "
                      "(a step it skips creates no optimizer temporaries, nor, the first time, "
                      "AdamW's state)", stacklevel=2)
        return SteppingScaler(self.device.type)

    def sight_optimizer(self, optimizer) -> None:
        super().sight_optimizer(optimizer)
        if self.tracker.labels is None:
            return
        # State belongs to its parameter's layer, also what a step made from nothing (AdamW's
        # step counts, made before the moments).
        for param, state in optimizer.state.items():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.tracker.own(value, self.tracker.layer_of(param))

    def build(self, make, device: torch.device):
        """Build on meta (outside the fake mode: PEFT and dtype casts swap tensors there, which
        fake tensors refuse), then give every parameter and buffer a fake CPU storage."""
        with unset_fake_temporarily():
            ctx = make(torch.device("meta"))
        layers = decoder_layers(ctx.model) if self.label_layers else None
        packed = _materialize(ctx.model, device)
        if ctx.reference is not None:  # an objective's reference copy (objectives.py)
            packed.update(_materialize(ctx.reference, device))
        if layers is not None and len(layers) == self._labelled_layers():
            # before the packed weights' stand-ins go
            own_layers(self.tracker, ctx.model, layers, unit_of=self._unit_of)
        _materialize_packed(packed, device, self._lifted)
        ctx.device = device
        self._model = ctx.model
        return ctx

    @contextlib.contextmanager
    def phase(self, name: str, step: int | None = None, micro: int | None = None):
        # No layer runs across a phase boundary (after a no-grad forward no backward hands the
        # label back: what the run frees after an evaluation is no layer's work); the optimizer
        # step's temporaries belong to the layer of the parameters they are made from, and so
        # do a save's (a merge's deltas, made from each layer's adapters in turn).
        self.tracker.layer, self.tracker.inherit = None, name in ("optimizer", "save")
        self.tracker.start_inheriting()
        try:
            with super().phase(name, step, micro):
                self._phase_name = name
                if name == "forward" and self.target == "cuda":
                    # The loop thread's handle serves the first forward matmul: made here, at
                    # the forward's start, where no layer runs (a few activations earlier than
                    # CUDA).
                    self._workspace("loop")
                yield
                self._phase_name = None
        finally:
            self.tracker.layer = None

    def _workspace(self, thread: str) -> None:
        if thread not in self._workspaces:
            self._workspaces[thread] = torch.empty(cublas_workspace_bytes(), dtype=torch.uint8,
                                                   device=self.device)
            self.sight(Kind.BUFFER, self._workspaces[thread])

    def _cuda_scratch(self, func, args) -> list[int]:
        if getattr(func, "overloadpacket", None) in _BLAS and self._phase_name == "backward":
            self._workspace("backward")  # autograd's device thread: a handle of its own
        return cuda_scratch(func, args)

    def _phase_closed(self, phase: Phase) -> None:
        if phase.name != "load" or not self.label_layers or self._model is None:
            return
        layers = decoder_layers(self._model)
        if layers is None or len(layers) != self._labelled_layers():
            self.labelled = (f"no list of {self._labelled_layers()} decoder layers found in "
                             "the model")
            return
        # Parameters are sighted by now: a real (packed 4-bit) one has its memoised fake copy.
        self._hooks = label_layers(self.tracker, self._model, layers,
                                   lambda t: t if is_fake(t) else self._fake.from_tensor(t),
                                   unit_of=self._unit_of)

    def _labelled_layers(self) -> int:
        """The decoder layers of the model whose trace is labelled: DEPTH units'."""
        return DEPTH if self.units is None else self.units.layers(DEPTH)

    def _unit_of(self, layer: int) -> int:
        """The label of a decoder layer: its unit (a period of layers, where they repeat)."""
        return layer if self.units is None else self.units.of(layer, DEPTH)

    def _memory(self) -> dict[str, Any]:
        self._device_modes.close()
        if self.card is not None:
            self.extra["simulated_gpu"] = {
                "name": self.card.name, "capability": ".".join(map(str, self.card.capability)),
                "multiprocessors": self.card.multiprocessors,
                # the SDPA kernels it ran (patches.cuda_attention), whatever the depth
                "attention_kernels": sorted(self.attention) or None}
        for handle in self._hooks:
            handle.remove()
        if self.tracker.labels is not None:
            # The encoder's windows travel as phases do, to the assembled clock.
            self.labelled = (self.tracker.allocations, self.tracker.labels, self.tracker.owners,
                             list(self.phases) + list(self.windows))
        named = self._named_blocks(self.tracker.allocations)
        memory = self._memory_of(self.tracker.allocations,
                                 analyse(named, self.phases, self.windows))
        if self.keep_snapshot:
            self.snapshot = snapshot_of(self.tracker.allocations)
        if self.assemble_to is not None:
            try:
                trace, analysis = self._assembled(self.assemble_to, named)
                assembled = self._memory_of(trace, analysis)
                # What the tracker would have counted at that depth.
                assembled["tracked_tensor_peak_bytes"] = analysis.peak_bytes
                self._assembled_at = (assembled, trace)
            except NotAssembled as e:
                self._assembled_at = e
        return memory

    def assembly(self) -> tuple[dict[str, Any], list]:
        """(memory section, trace) of the model `assemble_to` layers deep, from this run's
        labelled trace. Raises NotAssembled, saying why it could not be."""
        if isinstance(self._assembled_at, NotAssembled):
            raise self._assembled_at
        if self._assembled_at is None:
            raise NotAssembled("no assembly was asked for (assemble_to) or the run did not end")
        return self._assembled_at

    def _memory_of(self, trace, analysis) -> dict[str, Any]:
        """The record's memory section for an allocation trace and its analysis."""
        reserved, model = _reserved_levels(trace)
        stats = [(phase, {"peak_allocated_bytes": peak,
                          "peak_reserved_bytes": peak_within(*reserved, phase)[0]
                          if reserved else None})
                 for phase, peak in analysis.phase_peaks]
        self.extra["reserved_model"] = model
        return self._shape(stats, analysis)

    def _assembled(self, layers: int, named: list):
        """(trace, analysis) of the `layers`-deep model, from this run's labelled trace: each
        block named as the block it repeats (in `named`, this run's) was. Raises NotAssembled."""
        if not isinstance(self.labelled, tuple):
            raise NotAssembled(self.labelled or "the trace was not labelled by layer")
        trace, marks, origin = assemble(*self.labelled, layers)
        kinds = {block.ptr: block.kind for block in named}
        blocks = build_blocks(trace)
        for block in blocks:
            block.kind = kinds.get(origin[block.ptr])
        phases = [p for p in marks if p.name != "vision"]
        return trace, analyse(blocks, phases, [p for p in marks if p.name == "vision"])


_BLAS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm,
         torch.ops.aten.addbmm, torch.ops.aten.mv, torch.ops.aten.addmv, torch.ops.aten.dot,
         torch.ops.aten.addr, torch.ops.aten._addmm_activation}


_FLASH_BACKWARD = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
                   torch.ops.aten._scaled_dot_product_flash_attention_backward.default)


def cuda_scratch(func, args) -> list[int]:
    """Bytes the CUDA kernel of `func` allocates beside its outputs, where the fake kernel the
    simulation runs allocates none: flash attention's backward (see
    estimate.flash_backward_scratch), for the fp16/bf16 attention CUDA runs it for — the CPU
    kernel's op on fake CPU tensors, CUDA's own on the fake CUDA device."""
    if func not in _FLASH_BACKWARD:
        return []
    query, key = args[1], args[2]  # [B, H, S, D], [B, H_kv, S_k, D]
    if query.dtype not in (torch.float16, torch.bfloat16):
        return []  # CUDA runs fp32 attention in the memory-efficient kernel: not modelled
    b, heads, s, d = query.shape
    return flash_backward_scratch(b, heads, key.shape[1], s, key.shape[2], d,
                                  query.element_size())


_VALUE_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
                torch.ops.aten.index.Tensor, torch.ops.aten.nonzero.default,
                torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default)
# Ops whose output's shape, or whether they write at all, hangs on a boolean mask's values.
_MASKED = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
           torch.ops.aten.index_put.default)


@contextlib.contextmanager
def unwritten_files():
    """A save of fake tensors, through the libraries' own `save_pretrained`: safetensors'
    `save_file` (as transformers and PEFT call it) does what it does on the device — each tensor
    must be contiguous and is copied to the CPU (a fake CPU tensor here: no device memory) —
    and the file is made as large as its tensors' bytes, sparse, holding none of them (the
    real one adds a header of a few KiB). Tied or shared weights are told apart by their fake
    storage, which has no address. Yields a HostMemory that samples nothing."""
    import peft.peft_model
    import transformers.modeling_utils
    from safetensors.torch import _SIZE

    from harness.probes.host import HostMemory

    def save_file(tensors, filename, metadata=None):
        size = 0
        for name, tensor in tensors.items():
            if not tensor.is_contiguous():
                raise ValueError(f"You are trying to save a non contiguous tensor: `{name}`")
            if tensor.device.type != "cpu":
                tensor = tensor.to("cpu")
            size += tensor.numel() * _SIZE[tensor.dtype]
        with open(filename, "wb") as f:
            f.truncate(size)

    def storage_id(own):  # a module's id_tensor_storage, a fake storage by its object
        def id_tensor_storage(tensor):
            if not is_fake(tensor):
                return own(tensor)
            storage = tensor.untyped_storage()
            return tensor.device, storage._cdata, storage.nbytes()
        return id_tensor_storage

    modules = (transformers.modeling_utils, peft.peft_model)
    original = {(module, name): getattr(module, name) for module in modules
                for name in ("safe_save_file", "id_tensor_storage")}
    replaced = {(module, name): save_file if name == "safe_save_file" else storage_id(value)
                for (module, name), value in original.items()}
    for (module, name), value in replaced.items():
        setattr(module, name, value)
    try:
        yield HostMemory(sample=False)
    finally:
        for (module, name), value in original.items():
            setattr(module, name, value)


def device_kernels(func, args, kwargs):
    """The output of a device kernel whose fake (meta) kernel refuses inputs the device takes.
    `_grouped_mm` (transformers' grouped_mm experts, a mixture of experts' layers): its meta
    kernel checks CUDA's bf16 fast path only, while CPU's kernel, and CUDA's fallback for any
    other dtype (`_grouped_mm_fallback`: a matmul a group, into the one output), multiply fp32
    or fp16 groups too (QLoRA's k-bit preparation makes the experts fp32). The output as the
    kernel makes it (create_grouped_gemm_output_tensor): on CUDA each row padded to 16 bytes.
    Else NOT_ANSWERED."""
    if func is not torch.ops.aten._grouped_mm.default:
        return NOT_ANSWERED
    a, b = args[0], args[1]
    if a.dtype == b.dtype == torch.bfloat16 or not is_fake(a):
        return NOT_ANSWERED
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    if a.dim() == 2:
        shape = (offs.size(0), a.size(0), b.size(1)) if b.dim() == 2 else (a.size(0), b.size(-1))
    else:
        shape = (a.size(1), b.size(1)) if b.dim() == 2 else (a.size(0), a.size(1), b.size(-1))
    dtype = kwargs.get("out_dtype") or a.dtype
    align = 16 // dtype.itemsize if a.device.type == "cuda" else 1
    stride = [-(-shape[-1] // align) * align, 1]
    if len(shape) == 3:
        stride.insert(0, shape[1] * stride[0])
    return torch.empty_strided(shape, stride, dtype=dtype, device=a.device)


def library_values(func, args, liger: bool = False, known: dict | None = None):
    """The values the libraries' Python reads of fake tensors, which have none, where the
    answer is known and sizes no allocation. Liger (`liger`: on the fake CUDA device): fused
    linear cross-entropy's count of non-ignored tokens (`target_mask.sum().item()`, a divisor)
    and an `equal` test. `generate()`: whether any prompt is right-padded and whether the
    prompt's attention mask is all ones (no padding: no, yes), whether any prompt token id is
    negative (none is), the special-token checks that decide only warnings (answered no) and,
    after each token, whether every sequence is done — once it has reached the loop's own
    `max_length`, as for a run that never stops early (greedy, or GRPO's sampling with
    `min_new_tokens` its maximum). PEFT: the reads in _PEFT_VALUES below. A real tensor's value is its own
    (bitsandbytes' quantization state of packed weights, which stay real host tensors:
    `offset.item()` as a 4-bit layer is saved). TRL: the reads in _trl_value, from `known`
    (Probe.known: the counts of the harness's own batches). Reads from anyone else's code
    fail as ever."""
    if func not in _VALUE_READS:
        return NOT_ANSWERED
    if not is_fake(args[0]):  # a real tensor's (bitsandbytes' packed quantization state)
        with unset_fake_temporarily():
            return func(*args)
    frame = sys._getframe(1)
    if func in _MASKED:  # a shape, or a write, that hangs on values: a boolean mask's
        masks = [i for i in args[1] if i is not None]
        if not masks or any(m.dtype != torch.bool for m in masks):
            return NOT_ANSWERED
        answer = _peft_masked(frame, args[0]) if func is torch.ops.aten.index.Tensor \
            else NOT_ANSWERED
        if answer is NOT_ANSWERED and known:
            answer = _trl_value(frame, func, args, known)
        return answer
    if known:
        value = _trl_value(frame, func, args, known)
        if value is not NOT_ANSWERED:
            return value
    if known and "routing" in known:
        value = _expert_value(frame, func, args, known)
        if value is not NOT_ANSWERED:
            return value
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if liger and module.startswith("liger_kernel."):
            if func is torch.ops.aten.equal.default:
                return True
            return 1.0 if args[0].is_floating_point() else 1
        if module == "transformers.generation.utils":
            return _generation_value(frame)
        if module in _PEFT_VALUES:
            value = _PEFT_VALUES[module](frame, args[0])
            if value is not NOT_ANSWERED:
                return value
        frame = frame.f_back
    return NOT_ANSWERED


def _module_dropout(frame, tensor):
    """LoHa's and LoKr's `torch.rand(1) > module_dropout` in forward: whether the adapter
    joins this step. Answered yes — what a module_dropout of 0 (the default) always draws, and
    the step with the adapter's memory where it is above 0."""
    return True if frame.f_code.co_name == "forward" else NOT_ANSWERED


def _rank_allocation(frame, tensor):
    """AdaLoRA's budget masking (RankAllocator.mask_to_budget, once past `tinit`): the
    importance threshold (`kthvalue(...).item()`) and the rank pattern's booleans (`tolist()`)
    decide which values are zeroed in place and what the config records, no allocation."""
    if frame.f_code.co_name != "mask_to_budget":
        return NOT_ANSWERED
    return True if tensor.dtype == torch.bool else 0.0


def _no_infinite_logits(frame, tensor):
    """VB-LoRA's check that no logit is infinite (a resumed top-k-only model): it is not."""
    return False if frame.f_code.co_name == "_get_lora_matrices" else NOT_ANSWERED


# PEFT modules whose reads of a tensor's value decide no allocation: module → (frame, tensor)
# → the value, or NOT_ANSWERED.
_PEFT_VALUES = {"peft.tuners.loha.layer": _module_dropout,
                "peft.tuners.lokr.layer": _module_dropout,
                "peft.tuners.adalora.layer": _rank_allocation,
                "peft.tuners.vblora.layer": _no_infinite_logits}


def _peft_masked(frame, tensor):
    """`tensor[mask]` where PEFT's own construction fixes the mask. WaveFT's `get_delta_weight`
    keeps the spectrum's indices that fall inside the padded matrix (`padded_indices[:,
    valid_mask]`, `spectrum[valid_mask]`): all do, the indices being positions in the unpadded
    one shifted by half the padding, so each selection is a copy of the whole. Else
    NOT_ANSWERED."""
    while frame is not None:
        if (frame.f_globals.get("__name__") == "peft.tuners.waveft.layer"
                and frame.f_code.co_name == "get_delta_weight"):
            return tensor.clone()
        frame = frame.f_back
    return NOT_ANSWERED


def _expert_value(frame, func, args, known: dict):
    """Eager experts' loop (transformers' `*Experts.forward`, one generated pattern for every
    mixture-of-experts family): which experts the router chose (`expert_mask…nonzero()`), then
    for each the (slot, token) pairs routed to it (`torch.where(expert_mask[i])`) — the rows
    every expert's matmuls hold — and whether it is the padding expert (never). As
    `known["routing"]` says: balanced, every expert tokens × top_k / experts pairs (the first
    ones one more, to make the total); worst, every token to the same top_k experts. Either
    way tokens × top_k rows in all, what a layer saves for backward; worst makes each expert's
    temporaries largest."""
    loop = next((f for f in _frames(frame) if "expert_mask" in f.f_locals
                 and hasattr(f.f_locals.get("self"), "num_experts")), None)
    if loop is None:
        return NOT_ANSWERED
    if func is torch.ops.aten._local_scalar_dense.default:
        return False  # `expert_idx == self.num_experts`: a real expert
    if func is not torch.ops.aten.nonzero.default:
        return NOT_ANSWERED
    experts, (_, top_k, tokens) = loop.f_locals["self"].num_experts, \
        loop.f_locals["expert_mask"].shape
    pairs = tokens * top_k
    worst = known["routing"] == "worst"
    counted = known.setdefault("expert_calls", {})
    if args[0].dim() == 1:  # the experts hit: their indices, one a row
        counted[id(loop)] = 0
        return args[0].new_empty((top_k if worst else min(experts, pairs), 1),
                                 dtype=torch.int64)
    index = counted.get(id(loop), 0)
    counted[id(loop)] = index + 1
    rows = tokens if worst else pairs // experts + (index < pairs % experts)
    return args[0].new_empty((rows, args[0].dim()), dtype=torch.int64)


def _trl_value(frame, func, args, known: dict):
    """TRL's reads while its trainer computes a loss on the harness's batches, whose values the
    harness made (`known`: the micro-batch's counts, objectives._counts). None sizes anything
    but as the batch's counts say:
    - the fused LM head keeps only the positions with a label on CUDA (`hidden_states[mask]`,
      `labels[mask]`): `labels` rows;
    - DPO's and KTO's metrics select each half's completion positions (`chosen_…[chosen_mask]`:
      that half's count, KTO's desirable rows' for `chosen`); KTO picks its desirable and
      undesirable rows (`nonzero(bool_labels)`, `nonzero(~bool_labels)`);
    - GRPO's completions never stop early (min_new_tokens: max_completion_length): no row has
      an EOS (`eos_idx[is_eos.any(dim=1)]`: none), each keeps every token (`c[m]`, whose
      `.tolist()` is answered with a word's id), no reward is missing (`rewards[unscorable_mask]
      = nan`: no row; `isnan(rewards).all(dim=1).any()`: no); NaN-aware metrics keep every
      value;
    - every `.item()`, `.tolist()` and `total > 0` feeds only logged metrics, texts or rewards
      (which size nothing): answered 1 (true).
    """
    caller = next((f for f in _frames(frame)
                   if not f.f_globals.get("__name__", "").startswith(("torch", "harness"))), None)
    if caller is None:
        return NOT_ANSWERED
    module, code = caller.f_globals.get("__name__", ""), _function(caller)
    if not module.startswith("trl."):
        return NOT_ANSWERED
    index = func is torch.ops.aten.index.Tensor
    if func in (torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
        if module == "trl.trainer.grpo_trainer":  # writes into rows no mask selects
            return args[0] if func is torch.ops.aten.index_put_.default else args[0].clone()
        return NOT_ANSWERED
    if module == "trl.trainer.utils" and code == "_fused_forward" and index:
        return _selected(args[0], known["labels"], args[1])
    if module == "trl.trainer.utils" and code in ("nanmin", "nanmax") and index:
        return _selected(args[0], args[0].numel(), args[1])  # no NaN: every value
    if module == "trl.trainer.kto_trainer" and code == "_compute_loss" \
            and func is torch.ops.aten.nonzero.default:
        rows = known["desirable"] if args[0] is caller.f_locals.get("bool_labels") \
            else known["undesirable"]
        return args[0].new_empty((rows, args[0].dim()), dtype=torch.int64)
    if module in ("trl.trainer.dpo_trainer", "trl.trainer.kto_trainer") \
            and code == "_compute_loss" and index:
        for name, value in caller.f_locals.items():
            if value is args[0] and name.split("_")[0] in ("chosen", "rejected"):
                return _selected(args[0], known[name.split("_")[0]], args[1])
        return NOT_ANSWERED
    if module == "trl.trainer.grpo_trainer" and index:
        if code == "_generate_single_turn" and args[0].dim() == 1 and \
                args[0].dtype == torch.int64 and "eos_idx" in caller.f_locals:
            return _selected(args[0], 0, args[1])  # rows with an EOS: none
        return _selected(args[0], args[1][0].numel(), args[1])  # every token kept
    if func is torch.ops.aten.nonzero.default or index:
        return NOT_ANSWERED
    if module == "trl.trainer.grpo_trainer" and code == "_generate_single_turn" \
            and not args[0].is_floating_point():
        return known["word"]  # the completions' `.tolist()`: a word, no EOS, no padding
    if module == "trl.trainer.grpo_trainer" and code == "_calculate_rewards":
        return False  # `isnan(rewards).all(dim=1).any()`: every completion has its reward
    if module in _TRL_READS:  # its metrics' `.item()`s, texts' `.tolist()`s, `total > 0`
        return True if args[0].dtype == torch.bool else \
            1.0 if args[0].is_floating_point() else 1
    return NOT_ANSWERED


# TRL's modules whose reads of values (other than those sized above) feed only metrics,
# decoded texts and rewards.
_TRL_READS = ("trl.trainer.dpo_trainer", "trl.trainer.kto_trainer",
              "trl.trainer.reward_trainer", "trl.trainer.grpo_trainer",
              "trl.experimental.orpo.orpo_trainer", "trl.trainer.utils")


def _function(frame) -> str:
    """The name of the function a frame runs in: a comprehension's (its own frame before
    Python 3.12) is its enclosing function's."""
    while frame.f_code.co_name.startswith("<") and frame.f_back is not None:
        frame = frame.f_back
    return frame.f_code.co_name


def _frames(frame):
    """The calling frames, innermost first: the first outside torch and the harness is the
    library line that asked."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def _selected(tensor, count: int, indices=None):
    """`tensor[mask]` of a boolean mask over its leading dimensions (a 2-D one where
    `indices`, the index op's, are not given) with `count` true values."""
    dims = sum(i.dim() for i in indices if i is not None) if indices is not None else 2
    return tensor.new_empty((count, *tensor.shape[dims:]))


def _generation_value(frame):
    code = frame.f_code.co_name
    if code == "generate":
        # First whether any prompt is right-padded (only a warning hangs on it; none is),
        # then `(attention_mask == 1).all()` (it is).
        return "has_right_padding" in frame.f_locals
    if code == "_get_logits_processor":  # `(encoder_input_ids < 0).any()`: token ids are not
        return False
    if code == "_prepare_special_tokens":  # eos among pad, eos negative: only warnings hang on it
        return False
    if "unfinished_sequences" in frame.f_locals and "length" in frame.f_locals:  # StopCheck
        loop = frame.f_back
        while loop is not None and "stopping_criteria" not in loop.f_locals:
            loop = loop.f_back
        if loop is not None and loop.f_locals["stopping_criteria"].max_length is not None:
            return frame.f_locals["length"] >= loop.f_locals["stopping_criteria"].max_length
    return NOT_ANSWERED


EXTRAPOLATE_FROM = (2, 3)  # decoder layers simulated when a deep model's are all alike


def extrapolate(shallow, deeper, layers: int):
    """Every byte count of a run at EXTRAPOLATE_FROM[1] layers carried to `layers`, one layer's
    worth at a time: deeper + (layers − d) × (deeper − shallow). Exact wherever memory is affine
    in depth — parameters, grads and state per layer, activations kept per layer, the logits
    once — which each phase's peak is when the layers are identical."""
    steps = layers - EXTRAPOLATE_FROM[1]
    if isinstance(deeper, dict):
        return {k: extrapolate(shallow.get(k) if isinstance(shallow, dict) else None, v, layers)
                for k, v in deeper.items()}
    if isinstance(deeper, list) and isinstance(shallow, list) and len(shallow) == len(deeper):
        return [extrapolate(a, b, layers) for a, b in zip(shallow, deeper, strict=True)]
    if type(deeper) is int and type(shallow) is int:
        return deeper + steps * (deeper - shallow)
    return deeper


def repeak(memory: dict) -> dict:
    """The overall peak, its phase, step and breakdown, from (extrapolated) per-phase figures."""
    phases = {k: v for k, v in memory["phases"].items() if v}
    name = max(phases, key=lambda k: phases[k]["peak_allocated_bytes"])
    steps = memory["per_step_peak_allocated_bytes"]
    reserved = [v.get("peak_reserved_bytes") for v in phases.values()]
    if name != memory.get("peak_phase"):  # which micro-batch peaked there is not known
        memory["peak_micro_batch"] = None
    memory.update(
        peak_allocated_bytes=phases[name]["peak_allocated_bytes"], peak_phase=name,
        peak_step=None if name == "load" or not steps else steps.index(max(steps)),
        peak_reserved_bytes=None if None in reserved else max(reserved),
        breakdown_bytes=phases[name]["breakdown_bytes"])
    return memory


def _expandable() -> bool | None:
    """Whether the user's allocator configuration asks for expandable segments; None where it
    asks for behaviour the replay does not model."""
    conf = (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
            or "").replace(" ", "")
    if any(key in conf for key in ("max_split_size_mb", "roundup_power2_divisions")):
        return None
    return "expandable_segments:True" in conf


def snapshot_of(allocations) -> dict | None:
    """The memory_viz snapshot a CUDA run of this trace would leave (snapshot.py); None where
    the allocator configuration is not modelled."""
    from harness.probes.snapshot import simulated

    expandable = _expandable()
    return None if expandable is None else simulated(allocations, expandable)


def _reserved_levels(allocations) -> tuple[tuple[list[int], list[int]] | None, str | None]:
    """Reserved bytes over time, from the caching-allocator replay (allocator.py), and which
    configuration was replayed; (None, None) where the user's allocator configuration asks for
    behaviour the replay does not model."""
    expandable = _expandable()
    if expandable is None:
        return None, None
    levels = replay(allocations, expandable=expandable)
    return ([t for t, _ in levels], [r for _, r in levels]), \
        "cuda-caching-allocator (" + ("expandable_segments" if expandable else
                                      "default configuration") + ")"


def _materialize(model, device: torch.device) -> dict:
    """Fake storage for every parameter and buffer (`to_empty` under the fake mode); returns
    bitsandbytes' packed 4-bit weights by module, a Parameter subclass that cannot wrap a fake
    tensor. `_materialize_packed` then gives those real CPU storage that is never written (so
    never paged in: no RAM used) with the exact layout bitsandbytes' own quantizer produced on
    meta; the fake mode turns them into memoised fake copies where ops meet them (named in
    `sight`), and bitsandbytes' fake kernels (dequantize, 4-bit matmul) produce the
    de-quantised temporaries a real run makes."""
    packed = {m: m._parameters["weight"] for m in model.modules()  # own, not a PEFT wrapper's
              if getattr(m._parameters.get("weight"), "quant_state", None) is not None}
    # to_empty gives each module its own new tensor: tied weights (an LM head sharing the
    # embedding) would come back as two. Hide the second holders, then tie them again. A
    # module held by several parents (a PEFT method's bank shared by every layer: VB-LoRA,
    # Lily; CPT's reference to the embedding) would be converted once per parent, which the
    # second time cannot swap: hidden the same way.
    shared = _shared_parameters(model)
    for aliases in shared.values():
        for module, alias in aliases:
            module._parameters[alias] = None
    modules = _shared_modules(model)
    for parent, name, _ in modules:
        parent._modules[name] = None
    # to_empty wraps each fake tensor in a new Parameter: the hooks a method registered on the
    # old one (OSF's gradient projections) go with them, handles and all.
    hooked = [(module, name, param) for module in model.modules()
              for name, param in module._parameters.items()
              if param is not None and (param._backward_hooks
                                        or param._post_accumulate_grad_hooks)]
    model.to_empty(device=device)
    for module, name, old in hooked:
        new = module._parameters[name]
        if new is not old:
            if old._backward_hooks:
                new._backward_hooks = old._backward_hooks
            if old._post_accumulate_grad_hooks:
                new._post_accumulate_grad_hooks = old._post_accumulate_grad_hooks
    for parent, name, child in modules:
        parent._modules[name] = child
    for (owner, name), aliases in shared.items():
        for module, alias in aliases:
            module._parameters[alias] = getattr(owner, name)
    return packed


def _shared_modules(model) -> list[tuple]:
    """(parent, name, module) for every holding of a submodule but its first."""
    seen, again = {id(model)}, []
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is None:
                continue
            if id(child) in seen:
                again.append((parent, name, child))
            seen.add(id(child))
    return again


def _materialize_packed(packed: dict, device: torch.device, lifted: dict) -> None:
    """The packed 4-bit weights (see _materialize): unwritten real CPU storage in their layout.
    On the fake CUDA device, where no real tensor can be, each is entered in `lifted`: every
    fake mode that meets one (the probe's, and Dynamo's own under torch.compile) fakes it as
    a CUDA tensor made from meta, through no op (patches.real_tensors_lifted), so the tracker
    first counts it where an op first meets it, inside its layer (layers.py labels by that)."""
    real = []
    with unset_fake_temporarily():
        for module, weight in packed.items():
            module.weight = type(weight)(
                torch.empty_like(weight, device="cpu"), requires_grad=False,
                quant_state=_untouched(weight.quant_state, "cpu", real),
                blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
                quant_type=weight.quant_type, quant_storage=weight.quant_storage, module=module,
                bnb_quantized=True)
            real.append(module.weight)
    if device.type == "cuda":
        lifted.update((id(t), (t, device)) for t in real)


def _shared_parameters(model) -> dict[tuple, list[tuple]]:
    """(module, name) of a parameter's first holder → every other (module, name) holding it."""
    first: dict[int, tuple] = {}
    shared: dict[tuple, list[tuple]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in first:
                shared.setdefault(first[id(param)], []).append((module, name))
            else:
                first[id(param)] = (module, name)
    return shared


def _untouched(state, device, made: list):
    """A copy of a bitsandbytes QuantState whose tensors are unwritten storage on `device`
    (each also appended to `made`)."""
    if state is None:
        return None
    state = copy.copy(state)
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            setattr(state, name, torch.empty_like(value, device=device))
            made.append(getattr(state, name))
    state.state2 = _untouched(getattr(state, "state2", None), device, made)
    return state


def _lift_on_backward_thread(device: torch.device) -> None:
    """Backward of CUDA tensors runs on autograd's thread for that device, where the fake mode's
    thread-local "make new tensors on CPU, then move them" (patches.cuda_answers) is off: a
    `torch.tensor(..., device="cuda")` there (Liger's backward makes one) would ask the CPU
    build for CUDA memory. One tiny backward, before any tracking, turns it on there."""
    leaf = torch.empty((), device=device, requires_grad=True)
    leaf.register_hook(lambda grad: torch._C._set_only_lift_cpu_tensors(True))
    (leaf * 1).backward()
