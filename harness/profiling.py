"""Profile your own training code: the same phases, peaks and breakdown as `harness run`, in the
same record format, so a run of your script lands in the same tables, gate and history.

    import harness
    with harness.profile("my-run", model=model, optimizer=optimizer) as prof:
        for step, batch in enumerate(batches):
            with prof.phase("forward", step):
                optimizer.zero_grad(set_to_none=True)
                loss = model(**batch).loss
            with prof.phase("backward", step):
                loss.backward()
            with prof.phase("optimizer", step):
                optimizer.step()
    print(prof.record_path)

or, with transformers' `Trainer` (TRL's SFT, DPO and GRPO trainers too), no change to the loop:

    trainer = Trainer(..., callbacks=[harness.MemoryCallback("my-run")])

The callback's phases: forward from the step's start until a gradient first reaches what the
model's forward with grad returned (so a loss computed outside the model, and TRL's reference
forward without grad, are forward), backward until the optimizer step, optimizer to the step's
end (Trainer zeroes the grads there). With gradient accumulation each micro-batch has its
forward and backward (Trainer's `on_substep_end` ends one micro-batch, the next one's forward
starts there), so the next micro-batch's activations are activations, with the held grads
beside them. An evaluation inside `train()` is the phase eval: from its first forward without
grad outside a step to `on_evaluate`. A checkpoint Trainer saves is the phase save: from the
end of the step (or of the evaluation before it) to `on_save`. A `generate` inside a step
(TRL's GRPO makes its completions there) is the phase generate, its KV cache named. The probe
is the one `harness run` uses on that device (CUDA: the allocator's figures; CPU: the
profiler's allocator events), and it costs the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.probes import Kind, Probe, make_probe

if TYPE_CHECKING:
    from harness.record import Record

DEFAULT_OUT = Path("results") / "_scratch"


class Profiler:
    """A probe around code the harness did not write; `write()` makes its record."""

    def __init__(self, name: str, *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str | None = None, out: str | Path = DEFAULT_OUT,
                 train: dict[str, Any] | None = None):
        self.name, self.model, self.optimizer = name, model, optimizer
        if device is None:
            param = next(model.parameters(), None) if model is not None else None
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.out, self.train = Path(out), dict(train or {})
        self.probe: Probe = make_probe(self.device)
        self.record_path: Path | None = None
        self._hooks: list = []
        self._open: contextlib.AbstractContextManager | None = None
        self.current: str | None = None  # the phase entered with enter()

    def start(self) -> None:
        self.probe.start()
        existing = [*self.model.parameters(), *self.model.buffers()] if self.model else []
        if self.optimizer is not None:
            from harness.optimizers import state_tensors

            existing += state_tensors(self.optimizer)
        self.probe.seed(existing)  # made before the probe started: counted from its start
        if self.model is not None:
            self.probe.sight(Kind.PARAM, list(self.model.parameters()))
            self.probe.sight(Kind.BUFFER, list(self.model.buffers()))
            self._hooks = self.probe.tracker.watch_grads(self.model)

    def phase(self, name: str, step: int | None = None, micro: int | None = None):
        """A context: `name` is one of probes.PHASES (load, forward, …, save); `micro` the
        micro-batch of a step's forward or backward, with gradient accumulation."""
        return self._phase(name, step, micro)

    @contextlib.contextmanager
    def _phase(self, name: str, step: int | None, micro: int | None):
        with self.probe.phase(name, step, micro):
            yield
            if name == "optimizer" and self.optimizer is not None:
                self.probe.sight_optimizer(self.optimizer)

    # For callbacks, which see a phase's start and end as separate events.
    def enter(self, name: str, step: int | None, micro: int | None = None) -> None:
        self.leave()
        self._open, self.current = self.phase(name, step, micro), name
        self._open.__enter__()

    def leave(self) -> None:
        if self._open is not None:
            opened, self._open, self.current = self._open, None, None
            opened.__exit__(None, None, None)

    def stop(self) -> dict[str, Any]:
        self.leave()
        for handle in self._hooks:
            handle.remove()
        return self.probe.stop()

    def write(self, memory: dict[str, Any]) -> Path:
        from harness import report
        from harness.record import collect_env, new_run_id, write_record

        run_id = new_run_id()
        run_dir = self.out / self.name / run_id
        record = _record(self.name, run_id, self.model, self.device, self.train, memory)
        record.env = collect_env(str(self.device))
        self.record_path = run_dir / f"{self.name}.json"
        write_record(self.record_path, record)
        print(f"harness: {self.name}: record {self.record_path.resolve()}", file=sys.stderr,
              flush=True)
        report.write_summary(run_dir)
        return self.record_path


@contextlib.contextmanager
def profile(name: str, *, model=None, optimizer=None, device=None, out=DEFAULT_OUT,
            train: dict[str, Any] | None = None):
    """Measure the enclosed training code; mark its phases with `prof.phase(...)`. The record is
    written when the block ends (also when it raises: what was measured is kept)."""
    prof = Profiler(name, model=model, optimizer=optimizer, device=device, out=out, train=train)
    prof.start()
    try:
        yield prof
    finally:
        prof.write(prof.stop())


def _record(name: str, run_id: str, model, device: torch.device, train: dict,
            memory: dict) -> Record:
    """The record `harness run` writes (record.new_record), for code no scenario describes."""
    from harness.job import method_for
    from harness.record import Memory, new_record
    from harness.scenario import ModelSpec, Scenario, TrainSpec, Variant

    config = getattr(model, "config", None)
    label = getattr(config, "_name_or_path", None) or getattr(config, "model_type", None) or \
        type(model).__name__
    spec = TrainSpec(**{k: v for k, v in train.items()
                        if k in {f.name for f in dataclasses.fields(TrainSpec)}})
    variant = Variant(name=name, techniques=(), train=spec, description="profiled training code")
    scenario = Scenario(name=name, description="", path=Path(name), sha256=None,
                        model=ModelSpec(config=label,
                                        attn_implementation=getattr(
                                            config, "_attn_implementation", None) or "sdpa"),
                        train=spec, baseline=name, variants=(variant,))
    record = new_record(run_id=run_id, scenario=scenario, variant=variant, device=str(device),
                        method=method_for(str(device)), index=0)
    params = list(model.parameters()) if model is not None else []
    measured = memory.get("peak_allocated_bytes") is not None
    record.scenario.path = None  # no scenario file
    record.model.weights = None
    record.model.params_total = sum(p.numel() for p in params) or None
    record.model.params_trainable = sum(p.numel() for p in params if p.requires_grad) or None
    record.status = "ok" if measured else "error"
    record.error = None if measured else "nothing measured"
    record.memory = Memory.of(memory)
    record.notes = ["profiled: the phases are the user's code as the profiler marked them"]
    return record


class MemoryCallback:
    """A `transformers.TrainerCallback` that profiles a Trainer's (TRL's SFT, DPO, GRPO trainers')
    steps and writes one record when training ends. Made a TrainerCallback subclass when
    instantiated, so importing harness does not import transformers."""

    def __new__(cls, name: str, *, out: str | Path = DEFAULT_OUT):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def __init__(self):
                self.name, self.out = name, out
                self.prof: Profiler | None = None
                self.record_path: Path | None = None
                self._hook = self._eval_hook = self._generate = None
                self._step = self._micro = 0

            def on_train_begin(self, args, state, control, model=None, optimizer=None,
                               **kwargs):
                train = {"batch_size": args.per_device_train_batch_size,
                         "gradient_accumulation_steps": args.gradient_accumulation_steps,
                         "optimizer": str(getattr(args.optim, "value", args.optim)),
                         "lr": args.learning_rate,
                         "max_grad_norm": args.max_grad_norm, "seed": args.seed,
                         "warmup_steps": 0, "steps": args.max_steps}
                self.prof = Profiler(self.name, model=model, optimizer=optimizer, out=self.out,
                                     train=train)
                self.prof.start()
                self._hook = model.register_forward_hook(self._forward_done, with_kwargs=True)
                self._eval_hook = model.register_forward_pre_hook(self._forward_starts)
                self._generating(model)

            def _generating(self, model):
                """A `generate` inside a step (TRL's GRPO and online trainers make their
                completions there) is the phase generate, its KV cache named; the step's
                forward resumes after it."""
                own = model.generate

                def generate(*args, **kwargs):
                    if self.prof.current != "forward":  # Trainer's evaluation: part of eval
                        return own(*args, **kwargs)
                    step, micro = self._step, self._micro
                    hook = self.prof.probe.watch_cache(model)
                    self.prof.enter("generate", step)
                    try:
                        return own(*args, **kwargs)
                    finally:
                        hook.remove()
                        self.prof.enter("forward", step, micro)

                model.generate = generate
                self._generate = model

            def _forward_starts(self, module, args):
                # A forward without grad outside any step: Trainer's evaluation, to on_evaluate.
                if not torch.is_grad_enabled() and self.prof.current in (None, "save"):
                    self.prof.enter("eval", self._step)

            def on_evaluate(self, args, state, control, **kwargs):
                if self.prof is not None and self.prof.current == "eval":
                    self.prof.leave()
                    if control.should_save:  # Trainer saves right after it evaluates
                        self.prof.enter("save", self._step)

            def on_save(self, args, state, control, **kwargs):
                if self.prof is not None and self.prof.current == "save":
                    self.prof.leave()

            def _forward_done(self, module, args, kwargs, output):
                # The model's forward with grad is done: backward starts where a gradient
                # first reaches what it returned. Until then the step is still forward: a
                # loss computed outside the model, a reference forward without grad (TRL's
                # DPO runs it after the policy's).
                if not torch.is_grad_enabled() or self.prof.current != "forward":
                    return
                ids = kwargs.get("input_ids") if kwargs else None
                if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                    self.prof.train["seq_len"] = int(ids.shape[1])
                returned = output.values() if isinstance(output, dict) else (
                    output if isinstance(output, (tuple, list)) else (output,))
                step, micro = self._step, self._micro

                def backward_starts(grad):
                    if self.prof.current == "forward":  # the first of the outputs reached
                        self.prof.enter("backward", step, micro)

                for tensor in returned:
                    if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                        tensor.register_hook(backward_starts)

            def on_step_begin(self, args, state, control, **kwargs):
                self._step, self._micro = state.global_step, 0
                self.prof.enter("forward", self._step, self._micro)

            def on_substep_end(self, args, state, control, **kwargs):
                # A micro-batch's backward is done; the next one's forward starts.
                self._micro += 1
                self.prof.enter("forward", self._step, self._micro)

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.prof.enter("optimizer", self._step)

            def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
                if optimizer is not None:
                    self.prof.probe.sight_optimizer(optimizer)

            def on_step_end(self, args, state, control, **kwargs):
                self.prof.leave()
                # Then Trainer logs, evaluates (a no-grad forward starts that) and saves its
                # checkpoint (to on_save): what it decided is in `control` by now.
                if control.should_save and not control.should_evaluate:
                    self.prof.enter("save", self._step)

            def on_train_end(self, args, state, control, **kwargs):
                if self._hook is not None:
                    self._hook.remove()
                    self._eval_hook.remove()
                if self._generate is not None:
                    vars(self._generate).pop("generate", None)  # the class's own again
                self.prof.train["steps"] = state.global_step
                self.record_path = self.prof.write(self.prof.stop())

        return _Callback()
