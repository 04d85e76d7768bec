"""The few training steps every device shares, and the build that precedes them.

Phases, the same on every device:
  load       model built (weights in their load dtype), techniques applied, optimizer made
  forward    zero_grad(set_to_none=True), forward, the model's own loss
  backward   loss.backward()
  optimizer  clip_grad_norm_, optimizer.step()  (AdamW state is created at the first step)

With `gradient_accumulation_steps` G > 1 a step's forward and backward run G times, one per
micro-batch (`Phase.micro`), before its one optimizer step; the grads stay live from the first
micro-batch's backward to that step, and the loss is scaled as Trainer scales it (the model's
loss by the step's label count, `num_items_in_batch`; another loss divided by G).

Fixed-shape synthetic batches, labels = inputs. Warm-up steps run first: they count for the
peaks (the first optimizer step creates its state), not for step time.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
)

from harness import data, objectives
from harness import parallel as parallel_training
from harness.images import Images, encoder_name, make_images, place, vision_encoder
from harness.models import (
    ConfigSource,
    build_model,
    experts_of,
    load_config,
    quantized_weights,
    vocab_size,
)
from harness.objectives import ObjectiveSpec
from harness.optimizers import make_optimizer, paged_state_bytes
from harness.probes import Kind, Probe
from harness.scenario import (
    EvalSpec,
    GenerateSpec,
    ImagesSpec,
    ModelSpec,
    ParallelSpec,
    SaveSpec,
    TrainSpec,
)
from harness.techniques import BuildContext, Stage, TechniqueUse, apply_stage
from harness.techniques.peft_methods import virtual_tokens


@dataclass
class TrainResult:
    params_total: int = 0
    params_trainable: int = 0
    step_times_s: list[float] = field(default_factory=list)  # measured steps only
    warmup_times_s: list[float] = field(default_factory=list)  # compilation happens here
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)
    paged_optimizer_bytes: int | None = None  # state in unified memory: no allocator sees it
    quantized_weight_bytes: int | None = None  # bitsandbytes weights + their quantization state
    virtual_tokens: dict | None = None  # record.ModelPart.virtual_tokens
    experts: dict | None = None  # record.ModelPart.experts
    quantized_params: int | None = None  # how many original weights those hold
    saves: list[dict[str, Any]] = field(default_factory=list)  # each `save:` entry, as it ran
    lengths: list[int] | None = None  # `data:`: the source's lengths, and the batches drawn
    drawn: list | None = None
    objective: dict[str, Any] | None = None  # objectives.Objective.record
    images: Images | None = None  # a vision-language batch's images, made before the steps
    eval_images: Images | None = None  # an evaluation batch's (its own batch size)
    vision: dict | None = None  # record.ModelPart.vision


def make_batch(train: TrainSpec, vocab_size: int, device: torch.device,
               micro: int = 0, shape: tuple[int, int] | None = None,
               images: Images | None = None,
               host=contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """Random tokens of (batch_size, seq_len) — or `shape` — labels = inputs. With `images`
    (images.py) each row begins with its images' tokens, which have no label, and the batch
    holds their pixel values: made on the host (`host`: Probe.on_host, where a simulation
    keeps real values), then fetched to the device, as a collator's batch is; the text's
    tokens are drawn below the model's image tokens."""
    generator = torch.Generator().manual_seed(train.seed + micro)
    shape = shape or (train.batch_size, train.seq_len)
    if images is None:
        ids = torch.randint(0, vocab_size, shape, generator=generator)
        ids = ids.to(device)
        return {"input_ids": ids, "labels": ids}
    with host():
        ids = torch.randint(0, min(vocab_size, images.text_ids), shape, generator=generator)
        batch = {"input_ids": ids, **place(ids, images)}
    batch = {k: v.to(device) for k, v in batch.items()}
    # Copied even on the CPU: the processor's host tensors are not the batch's memory.
    return {**batch, **{k: v.to(device, copy=True) for k, v in images.pixels.items()}}


def _step_batches(batches: list[dict]) -> tuple[list[dict], dict]:
    """A step's micro-batches and the loss arguments they share: with accumulation, the
    step's label count (Trainer's `num_items_in_batch`)."""
    if len(batches) == 1:
        return batches, {}
    return batches, {"num_items_in_batch": label_count(batches)}


def label_count(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The tokens a step's loss averages over, its micro-batches together (each sequence's
    first token predicts nothing), as Trainer's `num_items_in_batch`: on the batches' device."""
    return sum((b["labels"][:, 1:] != -100).sum() for b in batches)


def build(spec: ModelSpec, source: ConfigSource, uses: tuple[TechniqueUse, ...],
          device: torch.device, parallel: ParallelSpec | None = None,
          train: TrainSpec | None = None,
          objective: ObjectiveSpec | None = None,
          images: Images | None = None) -> BuildContext:
    """The model with the techniques applied; with `parallel`, sharded or wrapped for this
    rank (parallel.py; the process group is up). A simulation builds on meta. `train`: the
    step whose micro-batches a data-driven initialisation runs on. `objective`: TRL's
    trainer around the finished model (`ctx.objective`, objectives.build) and, for a
    reference `copy`, the second model (`ctx.reference`): the base as the policy's is loaded
    (dtype, quantization), frozen, in eval mode. A vision-language model's image encoder
    trains only with `spec.train_vision`: else it is frozen, and no adapter goes in it
    (`ctx.frozen`); `images`: what the step's batches hold."""
    from harness.techniques import REGISTRY

    ctx = BuildContext(device=device)
    if train is not None:
        ctx.batches = lambda: [make_batch(train, vocab_size(ctx.model), device, micro,
                                          images=images)
                               for micro in range(train.gradient_accumulation_steps)]
    apply_stage(Stage.LOAD, ctx, uses)
    if objective is not None:  # a reward model is a sequence classifier
        ctx.load.head = objective.method.head
    on_meta = device.type != "meta" and parallel_training.build_on_meta(
        parallel, spec.weights, ctx.load.quantization is not None)
    ctx.model = build_model(spec, source, ctx.load, torch.device("meta") if on_meta else device)
    adapters = any(REGISTRY[u.name].adapters for u in uses)
    if objective is not None and objective.reference_of(adapters) == "copy":
        ctx.reference = build_model(spec, source, ctx.load, device).requires_grad_(False).eval()
    encoder = encoder_name(ctx.model)
    if encoder is not None and not spec.train_vision:
        ctx.frozen = rf"{re.escape(encoder)}(\..*)?"  # PEFT's exclude_modules: full match
    apply_stage(Stage.MODEL, ctx, uses)
    if ctx.frozen is not None:
        vision_encoder(ctx.model).requires_grad_(False)
    apply_stage(Stage.STEP, ctx, uses)
    if parallel is not None:
        parallel_training.wrap(ctx, parallel, device)
        if on_meta:
            parallel_training.materialize(ctx.model, device)
    if objective is not None:
        ctx.objective = objectives.build(ctx, objective, train, device, _checkpointing(uses),
                                         adapters)
        ctx.loss_fn = ctx.objective.loss
    return ctx


def build_failure(spec: ModelSpec, source: ConfigSource,
                  uses: tuple[TechniqueUse, ...]) -> tuple[TechniqueUse | None, Exception] | None:
    """None if the stack builds (`build`, on the meta device: nothing allocated), else what
    failed: the technique whose addition, in apply order, makes the build fail (None: the
    model itself) and what it raised. Validation uses it: what the libraries refuse here
    (PEFT's config checks and adapter injection, transformers' config and model classes) is
    bad input, named by the technique."""
    from harness.techniques import ordered

    def failure(stack) -> Exception | None:
        try:
            build(spec, source, tuple(stack), torch.device("meta"))
        except Exception as e:  # noqa: BLE001 - whatever it raised is the answer
            return e
        return None

    stack = [use for _, use in ordered(uses)]
    error = failure(stack)
    if error is None:
        return None
    for end in range(len(stack)):  # the shortest failing stack names the culprit
        early = failure(stack[:end])
        if early is not None:
            return (stack[end - 1] if end else None), early
    return (stack[-1] if stack else None), error


def run_steps(probe: Probe, spec: ModelSpec, source: ConfigSource,
              uses: tuple[TechniqueUse, ...], train: TrainSpec, device: torch.device,
              result: TrainResult, parallel: ParallelSpec | None = None,
              evaluation: EvalSpec | None = None,
              generation: GenerateSpec | None = None,
              saving: tuple[SaveSpec, ...] | None = None,
              drawn: list | None = None, objective: ObjectiveSpec | None = None,
              images: Images | None = None, eval_images: Images | None = None) -> None:
    """Build, then run warm-up + measured steps under `probe`, evaluating after the steps
    `evaluation` says, generating after the last, then saving. `drawn` (data.plan): each
    step's micro-batches in their real shapes, fetched to the device as the step starts,
    instead of fixed-shape ones made once. `objective` (objectives.py): TRL's trainer's loss
    on its own batches instead of the model's, its reference log-probs, if precomputed, in a
    phase `reference` before the steps. `images` (images.py): what each micro-batch's
    samples show, made on the host before (`eval_images`: an evaluation batch's). Fills
    `result` as it goes, so an OOM
    midway still leaves what was known (params, finished step times)."""
    torch.manual_seed(train.seed)
    if images is not None:  # a simulation follows the batch's values through the model
        probe.follow_values()
    with probe.phase("load"):
        ctx = probe.build(
            lambda where: build(spec, source, uses, where, parallel, train, objective, images),
            device)
        trl_objective = ctx.objective
        model = ctx.model
        for check in ctx.after_build:
            check(model)
        forward = ctx.forward_module or model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(train.optimizer, params, train, model)
        # What trains is what the optimizer left trainable (LoRA-FA freezes lora_A).
        params = [p for p in model.parameters() if p.requires_grad]
        # A step's micro-batches are on the device together, as Trainer fetches them.
        accumulation = train.gradient_accumulation_steps
        vocab = vocab_size(model)
        batches, loss_kwargs = [], {}
        if trl_objective is not None:
            batches = trl_objective.batches(accumulation, device, probe.on_host)
        elif drawn is None:
            batches, loss_kwargs = _step_batches(
                [make_batch(train, vocab, device, micro, images=images, host=probe.on_host)
                 for micro in range(accumulation)])
            # Every token but each row's first has a label, no row pads: what TRL's fused head
            # selects (chunked_nll impl: trl), answered so in a simulation.
            probe.known.update(labels=train.batch_size * (train.seq_len - 1), unpadded=True)
        quantized = quantized_weights(model)
        if ctx.reference is not None:
            quantized += quantized_weights(ctx.reference) + list(ctx.reference.parameters())
        probe.sight(Kind.PARAM, list(model.parameters()) + quantized)
        probe.sight(Kind.BUFFER, list(model.buffers()))
        probe.sight(Kind.INPUT, [batches, loss_kwargs])
    result.params_total = sum(_unpacked_numel(p) for p in model.parameters())
    if quantized:
        ids = {id(t) for t in quantized}
        result.quantized_weight_bytes = sum(t.numel() * t.element_size() for t in quantized)
        result.quantized_params = sum(_unpacked_numel(p) for p in model.parameters()
                                      if id(p) in ids)
    result.params_trainable = sum(p.numel() for p in params)
    result.virtual_tokens = virtual_tokens(model)
    result.experts = experts_of(model, spec.routing if probe.method == "simulated" else None)
    result.vision = _vision(model)
    if result.experts is not None and result.experts["implementation"] == "eager":
        probe.known["routing"] = spec.routing  # what a simulation's eager experts receive
    result.resolved = ctx.resolved
    grad_hooks = probe.tracker.watch_grads(model)
    if images is not None:
        grad_hooks += probe.watch_vision(vision_encoder(model))
    autocast = (torch.autocast(device.type, dtype=ctx.autocast_dtype) if ctx.autocast_dtype
                else contextlib.nullcontext())
    scaler = probe.grad_scaler() if ctx.grad_scaler else None
    if trl_objective is not None and objective.precomputed:
        with probe.phase("reference"):
            objectives.precompute(trl_objective, batches, autocast, probe.known)
            probe.sight(Kind.INPUT, batches)
    gathers = parallel_training.named_buffers(forward, probe.tracker)
    gathers.__enter__()
    try:
        for step in range(train.warmup_steps + train.steps):
            started = time.perf_counter()
            for micro in range(accumulation):
                last = micro == accumulation - 1
                prepared = None
                if trl_objective is not None:  # what a simulation answers reads with
                    probe.known.update(trl_objective.counts[micro])
                if trl_objective is not None and trl_objective.generates:
                    if micro == 0:  # Trainer releases the grads right after its optimizer step
                        optimizer.zero_grad(set_to_none=True)
                    prepared = trl_objective.prepare(probe, model, step, micro, accumulation,
                                                     autocast, batches[micro])
                    probe.sight(Kind.INPUT, prepared)
                with probe.phase("forward", step, micro):
                    if micro == 0:
                        optimizer.zero_grad(set_to_none=True)
                        if drawn is not None:  # the step's batches, as the dataloader gives
                            batch = batches = loss_kwargs = None
                            batches, loss_kwargs = _step_batches(
                                [data.make_batch(m, vocab, device, train.seed + 1000 * step + i)
                                 for i, m in enumerate(drawn[step])])
                            probe.sight(Kind.INPUT, [batches, loss_kwargs])
                    batch = batches[micro] if prepared is None else prepared
                    with autocast, probe.tracker.saved_tensors():
                        if ctx.loss_fn is None:
                            outputs = forward(**batch, use_cache=False, **loss_kwargs)
                            loss = outputs.loss
                            probe.sight(Kind.OUTPUT, [loss, outputs.logits])
                            # Keep only the loss, as a training loop does: the logits go
                            # unless saved.
                            del outputs
                        else:
                            counting = trl_objective.watch_forwards(model) \
                                if trl_objective is not None and step == micro == 0 else []
                            loss = ctx.loss_fn(model, batch)
                            for handle in counting:
                                handle.remove()
                            if accumulation > 1 and not (trl_objective is not None
                                                         and trl_objective.scales_loss):
                                loss = loss / accumulation
                            probe.sight(Kind.OUTPUT, loss)
                with probe.phase("backward", step, micro), \
                        parallel_training.gradient_sync(forward, model, last):
                    (scaler.scale(loss) if scaler else loss).backward()
                    # FSDP2 sets each sharded grad after its reduce-scatter, no accumulation
                    # hook.
                    probe.sight(Kind.GRAD, [p.grad for p in params if p.grad is not None])
            with probe.phase("optimizer", step):
                if scaler:
                    scaler.unscale_(optimizer)
                if train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                for hook in ctx.after_optimizer_step:  # before the grads go (AdaLoRA)
                    hook(step)
                probe.sight_optimizer(optimizer)
                if step == 0:  # again: FSDP2 re-allocates an uneven (padded) shard at its
                    probe.sight(Kind.PARAM, list(model.parameters()))  # first forward
            del loss  # (the last micro-batch's, kept to here as Trainer keeps its value)
            if trl_objective is not None and step == 0:
                result.objective = trl_objective.record(train)
            elapsed = time.perf_counter() - started
            (result.step_times_s if step >= train.warmup_steps else
             result.warmup_times_s).append(elapsed)
            last_step = step == train.warmup_steps + train.steps - 1
            if evaluation is not None and (
                    (step + 1) % evaluation.every_steps == 0 if evaluation.every_steps
                    else last_step):
                optimizer.zero_grad(set_to_none=True)  # as Trainer does after each step
                evaluate(probe, forward, model, evaluation, train, device, autocast, step,
                         eval_images)
        if generation is not None:
            optimizer.zero_grad(set_to_none=True)
            generate(probe, model, generation, train, device, autocast, step)
        if saving:
            optimizer.zero_grad(set_to_none=True)
            save(probe, model, saving, result)
    finally:
        gathers.__exit__(None, None, None)
        # Outside the measured steps; the state exists once the first step has run.
        result.paged_optimizer_bytes = paged_state_bytes(optimizer)
        for handle in grad_hooks:
            handle.remove()


def _vision(model) -> dict | None:
    """The record's `model.vision`: the image encoder's module, parameters, and whether it
    trains; None for a text-only model."""
    encoder = vision_encoder(model)
    if encoder is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"module": encoder_name(base),
            "params": sum(_unpacked_numel(p) for p in encoder.parameters()),
            "trained": any(p.requires_grad for p in encoder.parameters())}


def _checkpointing(uses: tuple[TechniqueUse, ...]) -> bool:
    return any(u.name in ("gradient_checkpointing", "activation_offload") for u in uses)


def evaluate(probe: Probe, forward, model, spec: EvalSpec, train: TrainSpec,
             device: torch.device, autocast, step: int, images: Images | None = None) -> None:
    """One evaluation, as Trainer's evaluation loop runs it: eval mode, no grad, each batch
    fetched to the device, the model's loss detached; with `keep_logits` the logits and labels
    concatenated over the batches on the device (transformers' own EvalLoopContainer).
    `images`: what each evaluation batch's samples show, as the steps' do."""
    from transformers.trainer_pt_utils import EvalLoopContainer

    settings = spec.resolved(train)
    shape = (settings["batch_size"], settings["seq_len"])
    logits = EvalLoopContainer(do_nested_concat=True, padding_index=-100)
    labels = EvalLoopContainer(do_nested_concat=True, padding_index=-100)
    with probe.phase("eval", step), _inference(model), autocast:
        for index in range(spec.batches):
            batch = make_batch(train, vocab_size(model), device, shape=shape,
                               micro=10_000 + index,  # not a training batch's seed
                               images=images, host=probe.on_host)
            probe.sight(Kind.INPUT, batch)
            outputs = forward(**batch, use_cache=False)
            loss = outputs.loss.detach()
            probe.sight(Kind.OUTPUT, [loss, outputs.logits])
            if spec.keep_logits:
                logits.add(outputs.logits.detach())
                labels.add(batch["labels"])
                probe.sight(Kind.OUTPUT, [logits.tensors, labels.tensors])
            del outputs, loss, batch
        del logits, labels


def generate(probe: Probe, model, spec: GenerateSpec, train: TrainSpec, device: torch.device,
             autocast, step: int) -> None:
    """`model.generate`: greedy, exactly `max_new_tokens` after a prompt of `prompt_len`
    (no early stop at an end-of-sequence token: random weights would stop anywhere), with the
    model's default KV cache, whose tensors are named as they are made (`Kind.KV_CACHE`)."""
    prompt = make_batch(train, vocab_size(model), device, micro=20_000,
                        shape=(spec.resolved(train)["batch_size"], spec.prompt_len))["input_ids"]
    hook = probe.watch_cache(model)
    try:
        with probe.phase("generate", step), _inference(model), autocast:
            probe.sight(Kind.INPUT, prompt)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=spec.max_new_tokens,
                                 min_new_tokens=spec.max_new_tokens, do_sample=False,
                                 use_cache=True, pad_token_id=0)
            probe.sight(Kind.OUTPUT, out)
            del out
    finally:
        hook.remove()


def save(probe: Probe, model, targets: tuple[SaveSpec, ...], result: TrainResult) -> None:
    """Each `save:` entry in order, into a temporary folder removed after it, as the job's last
    phases (`save`, one per entry, the optimizer state still live as in Trainer's final
    save): the files through transformers' and PEFT's own `save_pretrained` (safetensors).
    `merged` runs PEFT's `merge_and_unload()` first — on a 4-bit base it de-quantises each
    adapted layer to the compute dtype, adds the adapters' delta and quantises it again, one
    layer at a time — on the model's own device or, with `device: cpu`, after moving the model
    there; what comes after saves the merged model. Host memory is sampled as each runs."""
    for index, target in enumerate(targets):
        started = time.perf_counter()
        move = target.device not in (None, next(model.parameters()).device.type)
        skipped = parallel_training.save_refused(model, target.kind)
        if skipped is None and probe.method == "simulated":
            skipped = _not_simulated(target, model, move, probe)
            skipped = skipped and f"simulated: {skipped} (measure it on CPU or CUDA)"
        if skipped:
            result.saves.append({"skipped": skipped})
            continue
        with tempfile.TemporaryDirectory(prefix="harness-save-") as folder:
            with probe.phase("save", index), probe.saving() as host:
                if target.kind == "merged":
                    if move:
                        model = model.to(target.device)
                    model = model.merge_and_unload()
                    probe.sight(Kind.PARAM, list(model.parameters()) + quantized_weights(model))
                parallel_training.save_pretrained(model, folder, target.cpu_offload)
            files = [f for f in Path(folder).rglob("*") if f.is_file()]
            result.saves.append({  # beside what the record says was asked (SaveSpec.as_dict)
                "files": sorted(str(f.relative_to(folder)) for f in files),
                "written_bytes": sum(f.stat().st_size for f in files),
                "host_rss_peak_bytes": host.peak, "host_rss_growth_bytes": host.growth,
                "seconds": round(time.perf_counter() - started, 3)})


def _not_simulated(target: SaveSpec, model, move: bool, probe: Probe) -> str | None:
    """Why fake tensors cannot run this save, or None."""
    if target.kind == "full" and target.cpu_offload and parallel_training.is_sharded(model) \
            and probe.device.type == "cpu" and probe.target == "cuda":
        return ("the ranks run on fake CPU tensors for a CUDA target, where moving each "
                "gathered tensor to the CPU frees nothing (cpu_offload: false simulates)")
    if target.kind == "merged" and quantized_weights(model):
        return ("merging into 4-bit weights re-quantises each merged layer, which bitsandbytes "
                "does on real tensors only")
    if move:
        return (f"moving the model to {target.device} swaps each fake parameter for another, "
                "which the simulation's own references to it prevent")
    return None


@contextlib.contextmanager
def _inference(model):
    """Eval mode and no grad, as Trainer evaluates and generates; training mode restored."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def _unpacked_numel(param) -> int:
    """A packed 4-bit weight's original element count (its quant_state keeps the shape)."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def timing(result: TrainResult, train: TrainSpec) -> dict[str, float | None]:
    warmup = round(sum(result.warmup_times_s), 3) if result.warmup_times_s else None
    if not result.step_times_s:
        return {"step_time_s_median": None, "tokens_per_s": None, "warmup_s": warmup}
    median = statistics.median(result.step_times_s)
    if result.drawn is not None:  # real lengths: the measured steps' own tokens, padding too
        measured = result.drawn[train.warmup_steps:][:len(result.step_times_s)]
        tokens = sum(m.shape[0] * m.shape[1] for step in measured for m in step)
        total = sum(result.step_times_s)
        return {"step_time_s_median": median,
                "tokens_per_s": tokens / total if total > 0 else None, "warmup_s": warmup}
    return {"step_time_s_median": median,
            "tokens_per_s": train.effective_batch_size * train.seq_len / median
            if median > 0 else None,
            "warmup_s": warmup}


class Measured(NamedTuple):
    outcome: dict[str, Any]  # {status, error}: ok, oom, unsupported or error, and why
    memory: dict[str, Any]  # the record's memory section (the probe's)
    result: TrainResult
    notes: list[str]  # what the libraries warned about while it ran


def measure(scenario, source: ConfigSource, variant, train: TrainSpec, device: torch.device,
            budget_bytes: int | None, simulate: bool, target: str = "cuda",
            probe: Probe | None = None) -> Measured:
    """Build and train under a fresh probe (or `probe`, made for this run). Whatever the
    variant does — OOM, an unsupported technique, an exception — is its outcome."""
    from harness.probes import make_probe
    from harness.techniques import Unsupported

    probe = probe or make_probe(device, budget_bytes, simulate=simulate, target=target)
    result = TrainResult()
    outcome = {"status": "ok", "error": None}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        try:  # the lengths and batches drawn: before the probe, not the job's memory
            if variant.data is not None:
                result.lengths = data.read_lengths(variant.data, train.seed)
                result.drawn = data.plan(variant.data, result.lengths, train)
        except data.DataError as e:
            outcome = {"status": "error", "error": f"{e.key}: {e.message}"}
        if variant.images is not None and outcome["status"] == "ok":
            result.images = _images(variant.images, train.batch_size,
                                    scenario.model_of(variant), source)
            if variant.eval is not None:
                result.eval_images = _images(
                    variant.images, variant.eval.resolved(train)["batch_size"],
                    scenario.model_of(variant), source)
        probe.start()
        try:
            if outcome["status"] == "ok":
                run_steps(probe, scenario.model_of(variant), source, variant.techniques, train,
                          device, result, variant.parallel, variant.eval, variant.generate,
                          variant.save, result.drawn, variant.objective, result.images,
                          result.eval_images)
        except torch.OutOfMemoryError as e:
            outcome = {"status": "oom", "error": _first_line(e)}
        except Unsupported as e:
            outcome = {"status": "unsupported", "error": str(e)}
        except Exception as e:  # noqa: BLE001 - any failure of the variant is its result
            # The exception first (what a progress line shows), then where it was raised.
            # Simulated, an op that needs a tensor's value ends it as unsupported (_value_read).
            value_read = simulate and isinstance(
                e, (DataDependentOutputException, DynamicOutputShapeException))
            outcome = ({"status": "unsupported", "error": _value_read(e)} if value_read else
                       {"status": "oom", "error": _first_line(e)} if _is_oom(e) else
                       {"status": "error", "error": f"{type(e).__name__}: {_first_line(e)}\n"
                                                    + _tail(traceback.format_exc())})
        finally:
            memory = probe.stop()
    memory["paged_optimizer_bytes"] = result.paged_optimizer_bytes
    memory["quantized_weight_bytes"] = result.quantized_weight_bytes
    return Measured(outcome, memory, result, _notes(seen))


def _images(spec: ImagesSpec, batch_size: int, model: ModelSpec,
            source: ConfigSource) -> Images:
    """A batch's images, through the model's image processor (images.py), on the host
    before the probe starts: the processor's own tensors are not the job's device memory."""
    config = load_config(source, model.trust_remote_code)
    return make_images(spec, batch_size, config,
                       source.location if source.kind == "file" else None, source.hub)


def _value_read(error: Exception) -> str:
    """Why a simulation stopped at an op whose result depends on tensor values (a `.item()`,
    a `nonzero`): which library line asked, so the record names the code, not the simulator."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "site-packages" in f.filename and "/torch/" not in f.filename]
    where = ""
    if frames:
        path = frames[-1].filename.split("site-packages/")[-1]
        where = f" at {path}:{frames[-1].lineno}"
    op = str(error.args[0]) if error.args else type(error).__name__
    return (f"simulated: the step reads a tensor's value ({op}){where}, which fake tensors do "
            "not have; measure it (--device cpu or cuda)")


def _notes(caught: list[warnings.WarningMessage], limit: int = 20) -> list[str]:
    """What the libraries warned about while the variant ran (e.g. bitsandbytes falling back to
    non-paged state on CPU): it can change what the numbers mean, so it goes in the record."""
    notes: list[str] = []
    for w in caught:
        line = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:300]}"
        if line not in notes:
            notes.append(line)
    return notes[:limit]


def _is_oom(e: BaseException) -> bool:
    # OOMs raised inside autograd's engine can come back re-wrapped as a plain RuntimeError.
    text = str(e)
    return "out of memory" in text.lower() or "memory budget exceeded" in text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
