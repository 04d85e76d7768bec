"""What a simulation costs: wall time and host memory (peak RSS) of simulating full-size models.

Targets: one 7B variant in ≤ 5 s and ≤ 1 GiB RSS on a 2-core machine; the whole `qlora_mistral`
table in ≤ 60 s including process start. Each variant runs as a fresh `python -m harness.worker`
child (its import time included, its RSS read from the kernel's accounting of that child),
by default (3 layers, assembled to 32, checked against 2) and with --full-depth (every layer);
the table is `harness run qlora_mistral --device simulate`, as a user runs it, in both modes.

    .venv/bin/python scripts/bench_simulate.py [--out results/bench_simulate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CASES = [("qlora_mistral", "full-bf16"), ("qlora_mistral", "lora"), ("qlora_mistral", "qlora-gc")]


def one_variant(scenario: str, variant: str, folder: Path, full_depth: bool) -> dict:
    result = folder / f"{variant}.json"
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "harness.worker", "--scenario",
                              str(REPO / "scenarios" / f"{scenario}.yaml"), "--variant", variant,
                              "--device", "simulate", "--run-id", "bench", "--result",
                              str(result), *(["--full-depth"] if full_depth else [])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    # wait4: this child's own peak RSS (RUSAGE_CHILDREN would be the largest child so far).
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{scenario}/{variant}: worker exited {status}")
    record = json.loads(result.read_text())
    return {"scenario": scenario, "variant": variant, "full_depth": full_depth,
            "status": record["status"],
            "peak_allocated_bytes": record["memory"].get("peak_allocated_bytes"),
            "peak_reserved_bytes": record["memory"].get("peak_reserved_bytes"),
            "process_wall_s": round(wall, 2), "worker_wall_s": record["timing"]["wall_s"],
            "max_rss_bytes": usage.ru_maxrss * 1024}


def whole_table(scenario: str, folder: Path, full_depth: bool) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness", "run", scenario, "--device",
                           "simulate", "--out", str(folder / "table"),
                           *(["--full-depth"] if full_depth else [])],
                          capture_output=True, text=True, cwd=REPO, check=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"scenario": scenario, "full_depth": full_depth,
            "wall_s": round(time.perf_counter() - started, 2), "counts": summary["counts"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "results" / "bench_simulate.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variants = [one_variant(s, v, Path(tmp), full) for full in (False, True)
                    for s, v in CASES]
        tables = [whole_table("qlora_mistral", Path(tmp), full) for full in (False, True)]
    out = {"variants": variants, "tables": tables,
           "targets": {"variant_wall_s": 5, "variant_max_rss_bytes": 2**30, "table_wall_s": 60},
           "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                       "python": platform.python_version()}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
