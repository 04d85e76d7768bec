"""One real run of the large-vocabulary scenario, shared by the loss and compile tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import harness, last_json, records

TOKENS, VOCAB = 1023, 32768  # chunked_nll_bigvocab: next-token positions × vocabulary


@pytest.fixture(scope="session")
def bigvocab(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bigvocab")
    proc = harness("run", "chunked_nll_bigvocab", "--device", "cpu", "--out", str(out),
                   "--variant", "full-loss", "--variant", "chunked-256", "--variant", "compiled")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = records(Path(last_json(proc.stdout)["run_dir"]))
    for name, record in got.items():
        assert record["status"] == "ok", (name, record["error"])
    return got
