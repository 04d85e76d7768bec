"""OUT/report.md of the GPU check (scripts/gpu_check.sh): one page — what the machine has, each
step's outcome, and per variant the measured peaks (allocated and reserved) against the
simulation's and the estimate's, with the CUDA-only terms as a measurement sees them.

    python scripts/gpu_report.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.estimate import cublas_workspace_bytes
from harness.record import read_record

GIB = 2**30


def _records(folder: Path | None) -> dict[str, dict]:
    if folder is None or not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            out[path.stem] = read_record(path)
        except Exception:  # noqa: BLE001 - an unreadable record is reported as missing
            continue
    return out


def _gib(n) -> str:
    return "—" if n is None else f"{n / GIB:.3f}"


def _err(new, ref) -> str:
    return "—" if new is None or not ref else f"{(new / ref - 1) * 100:+.1f}%"


def report(out: Path) -> str:
    lines = ["# GPU check", ""]
    try:
        info = json.loads((out / "machine.json").read_text())
    except (OSError, ValueError):
        info = {}
    lines += ["## Machine", "", "```", json.dumps(info, indent=1) if info else
              "(no machine report: see logs/machine.log)", "```", ""]
    lines += ["## Steps", "", "| step | status | seconds | command |", "|:--|:--|--:|:--|"]
    for row in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").is_file() \
            else []:
        name, status, seconds, command = (row.split("\t") + ["", "", ""])[:4]
        lines.append(f"| {name} | {status} | {seconds} | `{command}` |")
    all_measured: dict[str, dict] = {}
    for methods in sorted((out / "methods").glob("*/*-methods")):
        scenario = methods.parent.name
        runs = sorted((out / "runs" / scenario).glob("*/"))
        measured = {k: r for k, r in _records(runs[0] if runs else None).items()
                    if r["method"] == "measured-cuda"}
        all_measured.update({f"{scenario}/{k}": r for k, r in measured.items()})
        lines += _comparison(scenario, measured, _records(methods / "simulated"),
                             _records(methods / "estimated"))
    lines += ["", "## CUDA-only terms", ""]
    lines += _cuda_terms(all_measured)
    return "\n".join(lines) + "\n"


def _comparison(scenario: str, measured: dict, simulated: dict, estimated: dict) -> list[str]:
    lines = ["", f"## {scenario}: measured vs simulated", ""]
    if not measured:
        lines += ["No measurement: this machine has no CUDA device (or the measured run "
                  "failed: see the steps). Simulated and estimated peaks only.", ""]
    lines += ["GiB; error: simulated (estimated) against measured.", "",
              "| variant | measured | sim | sim err | est | est err | measured reserved | "
              "sim reserved | reserved err | status |",
              "|:--|--:|--:|--:|--:|--:|--:|--:|--:|:--|"]
    for name in sorted(set(simulated) | set(measured) | set(estimated)):
        m, s, e = measured.get(name), simulated.get(name), estimated.get(name)

        def peak(r, key="peak_allocated_bytes"):
            return (r.get("memory") or {}).get(key) if r and r["status"] == "ok" else None

        status = " / ".join(f"{label} {r['status']}" for label, r in
                            (("measured", m), ("sim", s), ("est", e)) if r and r["status"] != "ok")
        lines.append(
            f"| {name} | {_gib(peak(m))} | {_gib(peak(s))} | {_err(peak(s), peak(m))} | "
            f"{_gib(peak(e))} | {_err(peak(e), peak(m))} | "
            f"{_gib(peak(m, 'peak_reserved_bytes'))} | {_gib(peak(s, 'peak_reserved_bytes'))} | "
            f"{_err(peak(s, 'peak_reserved_bytes'), peak(m, 'peak_reserved_bytes'))} | "
            f"{status or 'ok'} |")
    return lines


def _cuda_terms(measured: dict[str, dict]) -> list[str]:
    lines = []
    workspace = 2 * cublas_workspace_bytes()
    lines.append(f"- cuBLAS workspaces the simulation adds (two handles): "
                 f"{workspace / 2**20:.0f} MiB; a measurement has them inside its allocated peak.")
    for name, r in sorted(measured.items()):
        mem = r["memory"]
        used, others = mem.get("device_used_at_start_bytes"), mem.get("other_processes_bytes_at_start")
        context = used - (others or 0) if used is not None else None
        lines.append(
            f"- {name}: CUDA's total {_gib(mem.get('device_total_bytes'))} GiB; held before the "
            f"first tensor (the CUDA context, other processes taken off) "
            f"{'—' if context is None else f'{context / 2**20:.0f} MiB'}; allocator retries "
            f"{mem.get('alloc_retries')}; reserved − allocated "
            f"{_gib((mem.get('peak_reserved_bytes') or 0) - (mem.get('peak_allocated_bytes') or 0))} GiB")
    if not measured:
        lines.append("- measured: none on this machine")
    return lines


if __name__ == "__main__":
    target = Path(sys.argv[1])
    (target / "report.md").write_text(report(target))
