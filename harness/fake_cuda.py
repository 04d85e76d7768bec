"""A CUDA device for fake tensors on a CPU-only torch, so that a simulation takes the branches
every library takes on a GPU (Liger's CUDA paths, Inductor's Triton code, SDPA's CUDA kernels).

Fake tensors can say `device="cuda"` on a CPU build, but autograd asks the CUDA hooks whether
CUDA is built and for a device guard, and a CPU build has neither: backward aborts. `SOURCE`
registers both, as no-ops, from a small shared library built once against the installed torch's
headers with the system's C++ compiler (about 3 s) and cached. Torch reads its CUDA hooks once,
the first time it needs them — during `import torch` — so the library must be loaded before
torch is: `preload()`, first thing in a worker (worker.py) and in the test process. Loaded, it
changes nothing until `device()` switches it on: then the hooks say one device exists and
`torch.cuda`'s Python side answers as the simulated card would (its name, compute capability,
multiprocessor count); nothing is ever allocated on it — every tensor on it is fake.

Without a compiler, on a CUDA build of torch (real hooks registered: a machine that has a GPU
measures instead), or where torch was imported before the library, `unavailable()` says why,
and the simulation runs on fake CPU tensors, saying so in its record.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCE = r"""
// Switched off, exactly the CPU build's defaults; on, one CUDA device that owns no memory.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {
bool enabled = false;

struct FakeCUDAHooks final : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs /*unused*/) {}
  void init() const override {
    if (!enabled) at::CUDAHooksInterface::init();
  }
  bool isBuilt() const override { return enabled; }
  bool isAvailable() const override { return enabled; }
  bool hasCUDA() const override { return enabled; }
  bool hasPrimaryContext(c10::DeviceIndex index) const override {
    return enabled ? index == 0 : at::CUDAHooksInterface::hasPrimaryContext(index);
  }
  c10::DeviceIndex deviceCount() const override { return enabled ? 1 : 0; }
  c10::DeviceIndex current_device() const override { return enabled ? 0 : -1; }
  c10::DeviceIndex getCurrentDevice() const override { return enabled ? 0 : -1; }
  int getNumGPUs() const override { return enabled ? 1 : 0; }
  void setCurrentDevice(c10::DeviceIndex /*unused*/) const override {}
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex /*unused*/) const override { return 0; }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex /*unused*/) const override { return 0; }
};
}  // namespace

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
namespace at {
C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, FakeCUDAHooks);
}

extern "C" void harness_fake_cuda_switch(int on) { enabled = on != 0; }
"""

_loaded: ctypes.CDLL | None = None
_why_not: str | None = "not preloaded (harness.fake_cuda.preload() before import torch)"


def _torch_dir() -> Path | None:
    spec = importlib.util.find_spec("torch")
    return Path(next(iter(spec.submodule_search_locations))) if spec and \
        spec.submodule_search_locations else None


def _build_reason() -> str | None:
    """Why the installed torch cannot take the fake CUDA device, or None."""
    torch_dir = _torch_dir()
    if torch_dir is None:
        return "torch is not installed"
    if (torch_dir / "lib" / "libtorch_cuda.so").exists():
        return "this torch is a CUDA build: its own CUDA hooks cannot be replaced"
    return None


def cache_dir() -> Path:
    root = os.environ.get("HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "harness")
    return Path(root)


def library_path() -> Path:
    """Where the library for the installed torch and this source is cached."""
    key = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    return cache_dir() / f"fake_cuda-torch{importlib.metadata.version('torch')}-{key}.so"


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++")
                 if c and shutil.which(c)), None)


def build() -> str | None:
    """Build the library unless it is cached; None when it is there, else why it cannot be."""
    why = _build_reason()
    if why is not None:
        return why
    path = library_path()
    if path.exists():
        return None
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler (c++, g++, clang++) is on PATH to build the fake CUDA device"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, out = Path(tmp) / "fake_cuda.cpp", Path(tmp) / path.name
        src.write_text(SOURCE)
        torch_dir = _torch_dir()
        lib = torch_dir / "lib"
        proc = subprocess.run(
            [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-w",
             f"-I{torch_dir / 'include'}", str(src), f"-L{lib}", "-lc10", "-ltorch_cpu",
             f"-Wl,-rpath,{lib}", "-o", str(out)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return f"building the fake CUDA device failed ({compiler}): {last}"
        os.replace(out, path)  # atomic: a concurrent build never sees half a file
    return None


def preload() -> None:
    """Load the library if it is built, before torch is imported (afterwards torch has read its
    CUDA hooks already: `unavailable()` then says so). Safe to call more than once."""
    global _loaded, _why_not
    if _loaded is not None:
        return
    if "torch" in sys.modules:
        _why_not = "torch was imported before the fake CUDA device was loaded"
        return
    _why_not = _build_reason()
    if _why_not is not None:
        return
    path = library_path()
    if not path.exists():
        _why_not = f"the fake CUDA device is not built ({path} is missing)"
        return
    _loaded = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _why_not = None


def unavailable() -> str | None:
    """Why fake CUDA tensors cannot be simulated on in this process, or None."""
    return _why_not


@dataclass(frozen=True)
class Card:
    """What the libraries ask of the simulated GPU."""

    name: str
    capability: tuple[int, int]
    multiprocessors: int
    total_bytes: int


@contextlib.contextmanager
def device(card: Card) -> Iterator[None]:
    """While the block runs, one CUDA device (`card`) exists for fake tensors: the C++ hooks
    switched on and torch.cuda answering as that card would. Raises RuntimeError if
    `unavailable()`."""
    if _loaded is None:
        raise RuntimeError(f"no fake CUDA device: {_why_not}")
    from harness.patches import cuda_answers, triton_launches_skipped

    _loaded.harness_fake_cuda_switch(1)
    try:
        with cuda_answers(card), (triton_launches_skipped() if importlib.util.find_spec(
                "triton") else contextlib.nullcontext()), _whole_ops():
            yield
    finally:
        _loaded.harness_fake_cuda_switch(0)


@contextlib.contextmanager
def _whole_ops() -> Iterator[None]:
    """An op with a CPU kernel, no CUDA kernel (a CPU build has none) and a composite fallback
    would run as that composite on CUDA tensors — silu's backward as four ops and three
    temporaries where a CUDA build runs one fused kernel. A stand-in CUDA kernel for each such
    op (found by asking the dispatcher, not listed) sends it whole to the fake mode, which
    alone ever sees it: every tensor on this device is fake."""
    import torch

    def never(*args, **kwargs):
        raise RuntimeError("a stand-in CUDA kernel of the fake CUDA device ran on a real tensor")

    lib = torch.library.Library("aten", "IMPL")  # unregistered on exit
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("aten::") and has(name, "CPU") and not has(name, "CUDA") and \
                has(name, "CompositeImplicitAutograd"):
            lib.impl(name.removeprefix("aten::"), never, "CUDA")
    try:
        yield
    finally:
        lib._destroy()
