"""Every replacement of a library's internals the harness makes, in one place, each with the
symbols it replaces and the library versions it was written against.

The one thing to know: these symbols are private and may move or change shape in any release.
`PATCHES` names each one ("module:qualname") with the parameters it had when the patch was
written; `check_targets` says which no longer match, and tests/test_patches.py fails on any,
naming the symbol and the versions — so an upgrade breaks a test, not a figure. The patches
look their targets up through the same table, so the table cannot drift from what they patch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from harness.probes.timeline import Kind


@dataclass(frozen=True)
class Patch:
    """One patch: what it replaces and the versions whose internals it was written against."""

    name: str  # the context manager or class below that applies it
    # "module:qualname" of each replaced symbol → its parameter names when the patch was
    # written ("*args", "**kwargs" for variadic ones)
    targets: Mapping[str, tuple[str, ...]]
    written_against: Mapping[str, str]  # distribution → version
    why: str


FIND_PACKED = "transformers.masking_utils:find_packed_sequence_indices"
IGNORE_CAUSAL = "transformers.masking_utils:_ignore_causal_mask_sdpa"
MAYBE_OPT_STEP = "torch.amp.grad_scaler:GradScaler._maybe_opt_step"
_FSDP = "torch.distributed.fsdp._fully_shard."
ALLOC_STORAGE = _FSDP + "_fsdp_param:alloc_storage"
FREE_STORAGE = _FSDP + "_fsdp_param:free_storage"
GROUP_ALLOC_STORAGE = _FSDP + "_fsdp_param_group:alloc_storage"  # its own import of the above
INIT_UNSHARDED = _FSDP + "_fsdp_param:FSDPParam.init_unsharded_param"
SDPA = "torch.nn.functional:scaled_dot_product_attention"
TRITON_LAUNCH = "triton.runtime.jit:KernelInterface.__getitem__"
# torch.cuda's Python side, answered as the simulated card would (cuda_answers)
FAKE_CUDA: dict[str, tuple[str, ...]] = {f"torch.cuda:{name}": params for name, params in (
    ("is_available", ()), ("device_count", ()), ("current_device", ()), ("is_initialized", ()),
    ("_lazy_init", ()), ("get_device_capability", ("device",)),
    ("get_device_properties", ("device",)), ("get_device_name", ("device",)),
    ("synchronize", ("device",)), ("set_device", ("device",)),
    ("is_bf16_supported", ("including_emulation",)), ("device", ("device",)),
    ("get_rng_state", ("device",)), ("set_rng_state", ("new_state", "device")),
    ("manual_seed", ("seed",)), ("manual_seed_all", ("seed",)), ("_exchange_device", ("device",)),
    ("_maybe_exchange_device", ("device",)))}
# Inductor's generated code, run on fake tensors (compiled_code_traced)
_GUARDS = "torch._C:_dynamo.guards."
EMPTY_STRIDED = {device: f"{_GUARDS}_empty_strided_{device}" for device in ("cpu", "cuda")}
REINTERPRET = f"{_GUARDS}_reinterpret_tensor"
_ASYNC = "torch._inductor.async_compile:AsyncCompile."
CPP_KERNEL, TRITON_KERNEL = f"{_ASYNC}cpp_pybinding", f"{_ASYNC}triton"
_INTERFACE = "torch._dynamo.device_interface:CudaInterface."
CUDA_INTERFACE: dict[str, tuple[str, ...]] = {_INTERFACE + name: params for name, params in (
    ("get_device_properties", ("device",)), ("current_device", ()), ("device_count", ()),
    ("set_device", ("device",)), ("synchronize", ("device",)),
    ("exchange_device", ("device",)), ("maybe_exchange_device", ("device",)),
    ("is_bf16_supported", ("including_emulation",)))}
HASH_MODULE = {f"trl.trainer.{name}_trainer:hash_module": ("module",) for name in ("dpo", "kto")}
AVOID_DEVICE_INIT = "torch._subclasses.fake_tensor:FakeTensorMode.avoid_device_init"
FROM_REAL = "torch._subclasses.fake_tensor:FakeTensorConverter.from_real_tensor"

PATCHES: tuple[Patch, ...] = (
    Patch("unpacked_batches", {FIND_PACKED: ("position_ids",)}, {"transformers": "5.24.0"},
          "fake position ids cannot say whether a row packs several sequences; unanswered, "
          "transformers builds a full [B, 1, S, S] mask a real run of these batches never has"),
    Patch("unpadded_masks",
          {IGNORE_CAUSAL: ("padding_mask", "q_length", "kv_length", "q_offset", "kv_offset",
                           "local_attention_size")}, {"transformers": "5.25.0"},
          "transformers treats a fake attention mask as traced and never skips it; a batch "
          "the harness knows has no padding (an objective's) is skipped in a real run, SDPA "
          "then causal with no [B, 1, S, S] mask"),
    Patch("SteppingScaler",
          {MAYBE_OPT_STEP: ("self", "optimizer", "optimizer_state", "*args", "**kwargs")},
          {"torch": "2.13.0"},
          "GradScaler reads found_inf.item() to decide whether to step, a value fake tensors "
          "do not have"),
    Patch("fsdp2_storage_traced",
          {ALLOC_STORAGE: ("tensor",), FREE_STORAGE: ("tensor",),
           GROUP_ALLOC_STORAGE: ("tensor",), INIT_UNSHARDED: ("self",)},
          {"torch": "2.13.0"},
          "FSDP2 frees and re-allocates gathered parameters by resizing their storage in "
          "place, which no op shows the tracker; and it names each gather's buffers"),
    Patch("cuda_attention",
          {SDPA: ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                  "enable_gqa")}, {"torch": "2.13.0"},
          "a CPU build's SDPA has no kernel choice for CUDA: on fake CUDA tensors it would take "
          "the math path, which a GPU takes only where no fused kernel applies"),
    Patch("triton_launches_skipped", {TRITON_LAUNCH: ("self", "grid")}, {"triton": "3.9.0"},
          "a Triton kernel launch on fake tensors would compile for, and run on, a GPU that is "
          "not there; the kernels write into tensors Python allocated, so none is needed"),
    Patch("compiled_code_traced",
          {EMPTY_STRIDED["cpu"]: (), EMPTY_STRIDED["cuda"]: (), REINTERPRET: (),
           CPP_KERNEL: ("self", "argtypes", "source_code"),
           TRITON_KERNEL: ("self", "kernel_name", "source_code", "device_str")},
          {"torch": "2.13.0"},
          "Inductor's generated wrapper makes its buffers with C++ functions no dispatch mode "
          "sees, and runs compiled kernels that cannot run on fake tensors"),
    Patch("real_tensors_lifted",
          {FROM_REAL: ("self", "fake_mode", "t", "make_constant", "shape_env", "source",
                       "symbolic_context", "trace")},
          {"torch": "2.13.0"},
          "bitsandbytes' packed 4-bit weights are host tensors standing for fake CUDA ones; "
          "Dynamo's own fake mode, under torch.compile, would fake them on the CPU"),
    Patch("reference_unhashed", HASH_MODULE, {"trl": "1.16.0"},
          "with precompute_ref_log_probs TRL hashes every weight's bytes (an fp32 host copy "
          "of each) to name the cache file of a pass the harness runs itself, writing none; "
          "fake tensors have no bytes"),
    Patch("cuda_answers", {**FAKE_CUDA, **CUDA_INTERFACE, AVOID_DEVICE_INIT: ("self",)},
          {"torch": "2.13.0"},
          "a CPU build's torch.cuda says there is no GPU; libraries ask it before taking their "
          "CUDA branches (Dynamo binds its answers at import), and a simulation on fake CUDA "
          "tensors must be answered as a GPU — by every fake mode, not only the probe's"),
)
_PATCH_OF = {target: patch for patch in PATCHES for target in patch.targets}


class MovedSymbol(LookupError):
    """A patched symbol is not where the patch was written to find it."""


def _installed(patch: Patch) -> str:
    found = []
    for dist in patch.written_against:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)


def _versions(patch: Patch) -> str:
    wrote = ", ".join(f"{d} {v}" for d, v in patch.written_against.items())
    return f"patch {patch.name!r} was written against {wrote}; installed: {_installed(patch)}"


def _lookup(target: str) -> tuple[Any, str, Any]:
    module_name, _, qualname = target.partition(":")
    *path, name = qualname.split(".")
    owner = importlib.import_module(module_name)
    for part in path:
        owner = getattr(owner, part)
    return owner, name, getattr(owner, name)


def resolve(target: str) -> tuple[Any, str, Any]:
    """(owner, attribute name, symbol) of a "module:qualname" target in PATCHES. Raises
    MovedSymbol, naming the versions the patch was written against."""
    try:
        return _lookup(target)
    except (ImportError, AttributeError) as e:
        raise MovedSymbol(f"{target} not found ({e}); {_versions(_PATCH_OF[target])}") from None


def parameters(fn: Any) -> tuple[str, ...]:
    """fn's parameter names as a Patch lists them ("*args", "**kwargs" for variadic ones); a
    builtin without a signature: as its docstring's first line writes them."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    if isinstance(fn, property):
        fn = fn.fget
    try:
        found = inspect.signature(fn).parameters.values()
    except ValueError:
        head = (fn.__doc__ or "").strip().split("->")[0]
        inside = head[head.find("(") + 1:head.rfind(")")]
        return tuple(p.split("=")[0].strip() for p in inside.split(",") if p.strip()
                     and p.strip() != "*")
    return tuple(stars.get(p.kind, "") + p.name for p in found)


def check_targets(patches: Iterable[Patch] = PATCHES) -> list[str]:
    """One message per patched symbol that moved or whose parameters changed since the patch
    was written, naming the symbol and the versions; empty when all are as written against."""
    problems = []
    for patch in patches:
        for target, expected in patch.targets.items():
            try:
                _, _, symbol = _lookup(target)
            except (ImportError, AttributeError) as e:
                problems.append(f"{target} not found ({e}); {_versions(patch)}")
                continue
            found = parameters(symbol)
            if found != tuple(expected):
                problems.append(f"{target} takes ({', '.join(found)}), the patch was written for "
                                f"({', '.join(expected)}); {_versions(patch)}")
    return problems


@contextlib.contextmanager
def _replaced(replacements: dict[str, Any]) -> Iterator[None]:
    """Each target set to its replacement while the block runs; the originals back after."""
    originals = []
    try:
        for target, value in replacements.items():
            owner, name, original = resolve(target)
            # An inherited attribute is shadowed, then the shadow removed, not copied down.
            originals.append((owner, name, original, name in vars(owner)))
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, original, own in reversed(originals):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def reference_unhashed() -> contextlib.AbstractContextManager[None]:
    """DPOTrainer and KTOTrainer, built with `precompute_ref_log_probs`, hash the reference's
    weights (each copied to the host, bf16 ones up-cast to fp32) for the name of the cache file
    their pass writes — a pass the harness runs itself (objectives.precompute), writing no
    file. Not hashed: on the CPU the copies would count as device memory, and fake tensors
    have no bytes."""
    return _replaced({target: lambda module: "simulated" for target in HASH_MODULE})


def unpacked_batches() -> contextlib.AbstractContextManager[None]:
    """transformers asks the position ids whether several sequences are packed into one row
    (`(mask[:, -1] == 0).all()`), a question about values that fake tensors cannot answer, so it
    assumes they may be and builds a full [B, 1, S, S] mask — which also turns SDPA's `is_causal`
    path off. The harness's batches are one sequence per row by construction, and a real run
    answers "not packed" and passes no mask: answer the same for fake position ids — except a
    packed batch's (`data: {packing: true}`), whose position ids carry each token's sequence
    (data.SEQUENCE_INDEX), the answer a real run finds. Under torch.compile the question is
    traced, not answered (Dynamo's tensors have no values on a GPU either): the original runs,
    and asking `is_fake` there would break the graph."""
    from harness.data import SEQUENCE_INDEX

    _, _, original = resolve(FIND_PACKED)

    def find_packed_sequence_indices(position_ids):
        if torch.compiler.is_compiling():
            return original(position_ids)
        if is_fake(position_ids):
            return getattr(position_ids, SEQUENCE_INDEX, None)
        return original(position_ids)

    return _replaced({FIND_PACKED: find_packed_sequence_indices})


def unpadded_masks(known: Mapping) -> contextlib.AbstractContextManager[None]:
    """transformers skips the causal mask under SDPA when the attention mask pads nothing
    (`padding_mask.all()`), a question about values it does not ask of fake tensors: it
    builds the mask. Where the harness knows its batch pads nothing (`known["unpadded"]`, set
    from the host batch's values: objectives.Preference.batches) the fake mask is answered as
    no mask, the answer the real run finds."""
    _, _, original = resolve(IGNORE_CAUSAL)

    def ignore_causal_mask_sdpa(padding_mask, *args, **kwargs):
        if padding_mask is not None and is_fake(padding_mask) and known.get("unpadded") \
                and not torch.compiler.is_compiling():
            padding_mask = None
        return original(padding_mask, *args, **kwargs)

    return _replaced({IGNORE_CAUSAL: ignore_causal_mask_sdpa})


class SteppingScaler(torch.amp.GradScaler):
    """A GradScaler that steps without asking whether a gradient overflowed: that is a value
    (`found_inf.item()`), which fake tensors do not have. Scaling, unscaling (with its overflow
    check) and the scale's update run as ever."""

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)


@contextlib.contextmanager
def fsdp2_storage_traced(tracker) -> Iterator[None]:
    """While FSDP2 trains, tell `tracker` of each in-place storage resize it makes of gathered
    parameters (`free_storage`, `alloc_storage`: a free and a new allocation that no op shows),
    and name each all-gather's outputs and the unsharded parameter viewing them as COMM."""
    alloc, free, init_unsharded = (resolve(t)[2] for t in (ALLOC_STORAGE, FREE_STORAGE,
                                                           INIT_UNSHARDED))

    def alloc_storage(tensor):
        alloc(tensor)
        tracker.resized(tensor.untyped_storage())

    def free_storage(tensor):
        free(tensor)
        tracker.resized(tensor.untyped_storage())

    def init_unsharded_param(fsdp_param):  # after each all-gather's copy-out
        init_unsharded(fsdp_param)
        tracker.sight(Kind.COMM, [*fsdp_param.all_gather_outputs, fsdp_param._unsharded_param])

    with _replaced({ALLOC_STORAGE: alloc_storage, FREE_STORAGE: free_storage,
                    GROUP_ALLOC_STORAGE: alloc_storage, INIT_UNSHARDED: init_unsharded_param}):
        yield


def cuda_attention(capability: tuple[int, int],
                   chosen: dict[str, int] | None = None) -> contextlib.AbstractContextManager[None]:
    """SDPA on fake CUDA tensors as CUDA runs it (on any thread: checkpointing recomputes in
    autograd's), each call's kernel counted in `chosen`. A CPU build's kernel choice has no CUDA
    entry and would always take the math path (a full [B, H, S, S] score matrix); this imitates
    CUDA's choice, not its selection logic: flash attention for fp16/bf16 without a mask on
    compute capability ≥ 8.0 (head size ≤ 256; it takes grouped key/value heads); else the
    memory-efficient kernel (a mask as its bias), except for grouped key/value heads, which only
    flash takes (pytorch/pytorch#139586): those fall back to the math path, as on a GPU.
    Everything else goes to SDPA itself."""
    _, _, original = resolve(SDPA)
    aten = torch.ops.aten
    chosen = {} if chosen is None else chosen

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                     is_causal=False, scale=None, enable_gqa=False):
        # Under torch.compile Dynamo traces this function (is_fake would break its graph): in
        # a simulation every CUDA tensor it meets is fake.
        fake = torch.compiler.is_compiling() or is_fake(query)
        if not (fake and query.device.type == "cuda"):
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                            enable_gqa=enable_gqa)
        if capability >= (8, 0) and query.dtype in (torch.float16, torch.bfloat16) and \
                attn_mask is None and query.size(-1) <= 256:
            kernel, out = "flash", aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        elif key.size(-3) != query.size(-3):
            kernel, out = "math", original(query, key, value, attn_mask, dropout_p, is_causal,
                                           scale=scale, enable_gqa=enable_gqa)
        else:
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(
                    ~attn_mask, float("-inf"))
            kernel, out = "memory-efficient", aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, query.requires_grad, dropout_p, is_causal,
                scale=scale)[0]
        if not torch.compiler.is_compiling():  # a side effect Dynamo would break the graph on
            chosen[kernel] = chosen.get(kernel, 0) + 1
        return out

    return _replaced({SDPA: scaled_dot_product_attention})


class _OneDevice:
    """torch.cuda.device(i): there is one device and nothing to switch."""

    def __init__(self, device=None):
        self.idx = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def real_tensors_lifted(lifted: dict) -> contextlib.AbstractContextManager[None]:
    """Every fake mode — the probe's and Dynamo's own, under torch.compile — fakes each real
    tensor in `lifted` (id → (tensor, device)) as a fake tensor on that device, made from meta
    through no op, as the probe's mode was told beforehand (probes/simulate.py)."""
    _, _, original = resolve(FROM_REAL)

    def from_real_tensor(self, fake_mode, t, *args, **kwargs):
        entry = lifted.get(id(t))
        if entry is None or entry[0] is not t:
            return original(self, fake_mode, t, *args, **kwargs)
        memo = self._get_memo(t)  # each fake mode has its own converter, and memo
        if memo is not None:
            return memo
        with unset_fake_temporarily():
            meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        out = self.from_meta_and_device(fake_mode, meta, entry[1])
        self.set_tensor_memo(t, out)
        kept.append(out)  # the memo holds it weakly
        return out

    kept: list = []
    return _replaced({FROM_REAL: from_real_tensor})


def cuda_answers(card) -> contextlib.AbstractContextManager[None]:
    """torch.cuda's Python side answering as `card` (a fake_cuda.Card) would, while the fake
    CUDA device is on (fake_cuda.device): one device, its name, compute capability,
    multiprocessors and memory; nothing to synchronise or seed (every tensor on it is fake)."""
    from types import SimpleNamespace

    major, minor = card.capability
    props = SimpleNamespace(  # the fields of torch.cuda's _CudaDeviceProperties libraries read
        name=card.name, major=major, minor=minor, multi_processor_count=card.multiprocessors,
        total_memory=card.total_bytes, is_integrated=False, is_multi_gpu_board=False,
        gcnArchName="NVIDIA", warp_size=32, regs_per_multiprocessor=65536,
        max_threads_per_multi_processor=1536 if (major, minor) in ((8, 6), (8, 9)) else 2048,
        L2_cache_size=50 * 2**20, uuid="00000000-0000-0000-0000-000000000000")
    answers = {
        "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
        "is_initialized": lambda: True, "_lazy_init": lambda: None,
        "get_device_capability": lambda device=None: card.capability,
        "get_device_properties": lambda device=None: props,
        "get_device_name": lambda device=None: card.name,
        "synchronize": lambda device=None: None, "set_device": lambda device: None,
        "is_bf16_supported": lambda including_emulation=True: card.capability >= (8, 0),
        "device": _OneDevice,
        "get_rng_state": lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
        "set_rng_state": lambda new_state, device="cuda": None,
        "manual_seed": lambda seed: None, "manual_seed_all": lambda seed: None,
        "_exchange_device": lambda device: 0, "_maybe_exchange_device": lambda device: 0,
    }
    replacements = {target: answers[target.rpartition(":")[2]] for target in FAKE_CUDA}
    # Dynamo's CUDA interface holds torch.cuda's functions as bound at import: the same
    # answers (its exchange_device is torch.cuda's _exchange_device).
    replacements.update({target: staticmethod(answers[name if name in answers else f"_{name}"])
                         for target in CUDA_INTERFACE
                         for name in [target.rpartition(".")[2]]})
    # A fake mode makes a new CUDA tensor on CPU and moves it, rather than ask the device for
    # memory, only while torch.cuda says there is no GPU: on this device, there never is.
    replacements[AVOID_DEVICE_INIT] = property(lambda self: True)
    return _replaced(replacements)


class _NoKernel:
    """A compiled kernel that is never run: the tensors it would write into are fake."""

    def __init__(self, *args, **kwargs):
        pass

    def run(self, *args, **kwargs):
        return None

    def __call__(self, *args, **kwargs):
        return None


@contextlib.contextmanager
def compiled_code_traced(card=None) -> Iterator[None]:
    """torch.compile (Inductor) on fake tensors, its generated code seen as it runs: the
    wrapper's buffers (`empty_strided_cpu/cuda`, `reinterpret_tensor`, bound at the module's
    load from C++ functions no dispatch mode sees) made through the dispatcher, so the tracker
    sees each allocation and, at `del buf`, each free; every compiled kernel a no-op (neither
    built nor run: C++ for CPU, Triton for CUDA), extern kernels (matmuls) run as fake ops.
    With `card` (the fake CUDA device, whose torch.cuda answers are cuda_answers'), Inductor
    generates Triton code for that card: Triton's driver answers as the card, and joint-graph
    constant folding — which runs real ops on the device — is off (a difference from a GPU's
    compile)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    def empty_strided(device):
        return lambda size, stride, dtype: torch.empty_strided(size, stride, dtype=dtype,
                                                               device=device)

    def reinterpret_tensor(tensor, size, stride, offset=0):
        return torch.as_strided(tensor, size, stride, tensor.storage_offset() + offset)

    replacements = {EMPTY_STRIDED["cpu"]: empty_strided("cpu"),
                    EMPTY_STRIDED["cuda"]: empty_strided("cuda"),
                    REINTERPRET: reinterpret_tensor,
                    CPP_KERNEL: lambda self, argtypes, source_code: _NoKernel(),
                    TRITON_KERNEL: lambda self, kernel_name, source_code, device_str="cuda":
                    _NoKernel()}
    with contextlib.ExitStack() as stack:
        if card is not None:
            stack.enter_context(inductor_config.patch(joint_graph_constant_folding=False))
            # A checkpointed region's random ops (dropout) replay their CUDA generator's state
            # in backward; a CPU build has no CUDA generator. Saving the state as a tensor
            # instead (a few bytes, in host memory) is the partitioner's other path.
            stack.enter_context(functorch_config.patch(graphsafe_rng_functionalization=False))
            stack.enter_context(_triton_target(card))
            if not hasattr(torch._C, "_cuda_getCurrentRawStream"):  # a CPU build has none
                torch._C._cuda_getCurrentRawStream = lambda device: 0
                stack.callback(delattr, torch._C, "_cuda_getCurrentRawStream")
        stack.enter_context(_replaced(replacements))
        yield


@contextlib.contextmanager
def _triton_target(card) -> Iterator[None]:
    """Triton's active driver answering as `card` would (Inductor asks it which GPU to
    generate code for); the machine's own driver back afterwards."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
    except ImportError:  # no Triton: Inductor says it cannot generate CUDA code
        yield
        return

    class Card:
        def get_current_target(self):
            return GPUTarget("cuda", card.capability[0] * 10 + card.capability[1], 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    previous = driver._active
    driver.set_active(Card())
    try:
        yield
    finally:
        driver._active = previous


def triton_launches_skipped() -> contextlib.AbstractContextManager[None]:
    """Every `kernel[grid](...)` launch — JIT, autotuned and heuristics kernels alike — does
    nothing: what a simulation needs of a Triton kernel is the tensors the Python around it
    allocates (its outputs, its scratch), which it writes into and never allocates itself."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    return _replaced({TRITON_LAUNCH: __getitem__})
