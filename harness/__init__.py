"""Empirical GPU-memory profiling of LLM fine-tuning: scenario → one process per variant →
measured peak memory per phase, with a breakdown → records and a tidy table.

`harness.load_results(path)` returns every record under `path` as a pandas DataFrame.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_results", "load_scenario"]


def __getattr__(name: str):
    # Lazy: `python -m harness validate` should not pay for pandas or torch.
    if name == "load_results":
        from harness.report import load_results

        return load_results
    if name == "load_scenario":
        from harness.scenario import load_scenario

        return load_scenario
    raise AttributeError(name)
