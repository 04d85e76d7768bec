"""How much the CPU probe slows a training step: probed step time / unprobed step time.

Target: ≤ 1.5×. The unprobed step is the plain loop a user writes (zero_grad, forward, backward,
clip, AdamW step); the probed one is `harness.train.run_steps` under the CPU probe (profiler
memory events + the tensor-naming tracker). Same model, shapes, seed; medians of measured steps.

    .venv/bin/python scripts/bench_probe_overhead.py [--steps 5] [--out results/bench_probe_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from harness.models import resolve_config
from harness.optimizers import make_optimizer
from harness.probes import make_probe
from harness.scenario import ModelSpec, TrainSpec
from harness.techniques import REGISTRY, TechniqueUse
from harness.train import TrainResult, make_batch, run_steps

CASES = [
    # (label, model config, techniques, batch, seq)
    ("tiny-llama full fp32, 2×256", "tiny-llama", (), 2, 256),
    ("tiny-llama LoRA bf16, 2×256", "tiny-llama",
     (TechniqueUse("bf16"), TechniqueUse("lora", REGISTRY["lora"].resolve_args({"r": 16}))), 2, 256),
    ("tiny-mistral full fp32, 4×512", "tiny-mistral", (), 4, 512),
]


def unprobed_steps(config: str, uses, train: TrainSpec) -> list[float]:
    from harness.train import build

    spec = ModelSpec(config=config)
    source = resolve_config(spec, Path("scenarios/x.yaml"))
    torch.manual_seed(train.seed)
    ctx = build(spec, source, uses, torch.device("cpu"))
    model = ctx.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(train.optimizer, params, train)
    batch = make_batch(train, model.config.vocab_size, torch.device("cpu"))
    times = []
    for step in range(train.warmup_steps + train.steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        if step >= train.warmup_steps:
            times.append(time.perf_counter() - started)
    return times


def probed_steps(config: str, uses, train: TrainSpec) -> list[float]:
    spec = ModelSpec(config=config)
    source = resolve_config(spec, Path("scenarios/x.yaml"))
    probe = make_probe(torch.device("cpu"))
    result = TrainResult()
    probe.start()
    try:
        run_steps(probe, spec, source, uses, train, torch.device("cpu"), result)
    finally:
        started = time.perf_counter()
        probe.stop()
        analysis_s = time.perf_counter() - started
    return result.step_times_s, analysis_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/bench_probe_overhead.json"))
    args = parser.parse_args()
    rows = []
    for label, config, uses, batch, seq in CASES:
        train = TrainSpec(batch_size=batch, seq_len=seq, steps=args.steps, warmup_steps=1)
        plain = statistics.median(unprobed_steps(config, uses, train))
        probed_times, analysis_s = probed_steps(config, uses, train)
        probed = statistics.median(probed_times)
        rows.append({"case": label, "unprobed_step_s": round(plain, 4),
                     "probed_step_s": round(probed, 4), "ratio": round(probed / plain, 2),
                     "analysis_after_run_s": round(analysis_s, 2)})
        print(f"{label:<34} unprobed {plain:.3f} s  probed {probed:.3f} s  "
              f"ratio {probed / plain:.2f}×  (+{analysis_s:.1f} s analysis after the run)")
    report = {"benchmark": "probe_overhead", "target_ratio": 1.5, "steps": args.steps,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
