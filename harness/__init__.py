"""Empirical GPU-memory profiling of LLM fine-tuning: scenario → one process per variant →
measured peak memory per phase, with a breakdown → records and a tidy table.

`harness.load_results(path)` returns every record under `path` as a pandas DataFrame.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"
__all__ = ["MemoryCallback", "load_results", "load_scenario", "profile"]


class _QuietOptionalKernel(logging.Filter):
    """bitsandbytes (imported by PEFT) warns at import, on CPUs with AVX512-BF16, that an
    optional CPU 4-bit kernel from the Hub is not installed, then uses its own. The warning is
    not about any run, and it would break the one-line error contract of every command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuietOptionalKernel())


def __getattr__(name: str):
    # Lazy: `python -m harness validate` should not pay for pandas or torch.
    if name == "load_results":
        from harness.report import load_results

        return load_results
    if name == "load_scenario":
        from harness.scenario import load_scenario

        return load_scenario
    if name in ("profile", "MemoryCallback"):
        from harness import profiling

        return getattr(profiling, name)
    raise AttributeError(name)
