"""scripts/check_private_apis.py reads a release's wheel for every private API the harness
uses: the installed sources pass, and a release where a patched function moved fails naming it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # zips the installed torch's sources, runs the script

SCRIPT = REPO / "scripts" / "check_private_apis.py"


def _wheel(path: Path, package, version: str, edit=None) -> Path:
    """A wheel-shaped zip of the installed package's Python sources."""
    root = Path(package.__file__).parent
    wheel = path / f"{package.__name__}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for source in root.rglob("*.py"):
            name = f"{package.__name__}/{source.relative_to(root)}"
            text = source.read_text(errors="replace")
            zf.writestr(name, edit(name, text) if edit else text)
    return wheel


def _run(*wheels: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, wheels)], capture_output=True,
                          text=True, timeout=120)


def test_the_installed_releases_have_every_private_api(tmp_path):
    proc = _run(_wheel(tmp_path, torch, "installed"), _wheel(tmp_path, transformers, "installed"))
    assert proc.returncode == 0, proc.stdout
    assert "[ok] torch.distributed.fsdp._fully_shard._fsdp_param_group:alloc_storage" in proc.stdout
    assert "MISSING" not in proc.stdout


def test_a_release_where_a_patched_function_moved_fails_naming_it(tmp_path):
    def moved(name: str, text: str) -> str:
        return text.replace("def find_packed_sequence_indices(",
                            "def find_packed_sequences(") if name.endswith("masking_utils.py") \
            else text

    proc = _run(_wheel(tmp_path, transformers, "9.9.9", moved))
    assert proc.returncode == 1
    assert "[MISSING] transformers.masking_utils:find_packed_sequence_indices" in proc.stdout
    assert importlib.util.find_spec("transformers.masking_utils") is not None
