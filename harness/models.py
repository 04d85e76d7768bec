"""Build a model from a committed config (random weights) or with `from_pretrained`.

Random weights are created directly on the target device and in the target dtype, module by
module, exactly as `from_pretrained(dtype=...)` lays them out: the load phase never holds a
second full-precision copy. Training memory does not depend on weight values.

How `model.config` resolves:
  a bare name                       → scenarios/models/<name>.json (the harness's own)
  ends in .json, or starts ./ ../ / → a config file, or a folder holding config.json,
                                      relative to the scenario file
  anything else                     → a hub id (weights: pretrained, or found in the local cache)
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from harness.scenario import ModelSpec
    from harness.techniques import LoadOptions

MODEL_DIR = Path(__file__).resolve().parent.parent / "scenarios" / "models"
# LoadOptions.head → transformers' auto class. A sequence classifier (a reward model) has one
# label: a score head of hidden × 1 in place of the LM head, one score a sequence.
HEADS = {"causal_lm": "AutoModelForCausalLM",
         "sequence_classification": "AutoModelForSequenceClassification"}
_BARE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ConfigSource:
    kind: str  # "file" | "hub"
    location: str  # absolute path to config.json, or a hub id
    label: str  # as written in the scenario
    layers: int | None = None  # build with this many decoder layers (simulation's extrapolation)
    hub: str | None = None  # the hub id it came from (`config: org/name`); None: a name or path


def resolve_config(spec: ModelSpec, scenario_path: Path) -> ConfigSource:
    text = spec.config
    if text.endswith(".json") or text.startswith(("./", "../", "/")):
        path = (Path(scenario_path).parent / text).resolve()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"config file not found: {path}")
        if spec.weights == "pretrained" and not _has_weights(path.parent):
            raise ModelConfigError(f"weights: pretrained, but {path.parent} holds no "
                                   "*.safetensors or *.bin weights")
        return ConfigSource("file", str(path), text)
    if _BARE_NAME.match(text):
        path = MODEL_DIR / f"{text}.json"
        if spec.weights == "pretrained" and path.is_file():
            raise ModelConfigError(f"{text!r} is a shipped config without weights: use "
                                   "weights: random, or a hub id or folder with weights")
        if not path.is_file():
            known = sorted(p.stem for p in MODEL_DIR.glob("*.json"))
            hint = difflib.get_close_matches(text, known, n=1)
            raise ModelConfigError(f"no model config {text!r} under scenarios/models" +
                                   (f" (did you mean {hint[0]!r}?)" if hint else
                                    f"; known: {', '.join(known)}"))
        return ConfigSource("file", str(path), text)
    # A hub id ("org/name"): its config.json, and only that, from the local cache or the hub.
    cached = hub_config(text)
    if spec.weights != "pretrained":
        return ConfigSource("file", cached, text, hub=text)
    return ConfigSource("hub", text, text, hub=text)


def hub_config(repo_id: str) -> str:
    """The local path of a hub model's config.json: from the cache, else fetched (honouring
    HF_TOKEN and HF_HUB_OFFLINE). Fails in seconds, not after the hub library's retries,
    when the hub cannot be reached."""
    return hub_file(repo_id, "config.json")


def hub_file(repo_id: str, filename: str, required: bool = True) -> str | None:
    """The local path of one file of a hub model (hub_config's way). Not `required`: None
    where it is neither cached nor fetchable (offline, unreachable, not in the repo)."""
    from huggingface_hub import constants, get_session, hf_hub_download, try_to_load_from_cache

    def missing(message: str) -> None:
        if required:
            raise ModelConfigError(message)

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except Exception as e:  # noqa: BLE001 - huggingface_hub rejects malformed ids
        missing(f"not a config name, path or valid hub id: {e}")
        return None
    if isinstance(cached, str):
        return cached
    if constants.HF_HUB_OFFLINE:
        missing(f"hub id {repo_id!r}: {filename} is not in the local cache "
                f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set")
        return None
    try:  # one request, no retries: whether the hub answers at all
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as e:  # noqa: BLE001 - DNS, refused, timed out: all say the same
        missing(f"hub id {repo_id!r}: not in the local cache, and {constants.ENDPOINT} cannot "
                f"be reached ({e})")
        return None
    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # noqa: BLE001 - not found, gated without HF_TOKEN, …
        said = " ".join(str(e).split())
        missing(f"hub id {repo_id!r}: {filename} cannot be fetched: "
                f"{type(e).__name__}: {said[:200]}")
        return None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def load_config(source: ConfigSource, trust_remote_code: bool = False):
    """A fresh config object: transformers' from_config mutates the config it is given."""
    from transformers import AutoConfig

    where = source.location
    if source.kind == "file" and Path(where).name == "config.json":
        where = str(Path(where).parent)  # the folder: custom code lies beside config.json
    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    if source.layers is not None:  # the text model's layers (a multimodal config nests them)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.num_hidden_layers = source.layers
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:source.layers]
    return config


def custom_code_reason(source: ConfigSource, trust_remote_code: bool) -> str | None:
    """Why a config naming its own code (`auto_map`) could not be read without
    trust_remote_code, in our words rather than transformers' (which builds a hub URL from a
    local path); None otherwise (with it, transformers says which file is missing)."""
    import json

    if trust_remote_code:
        return None
    try:
        auto_map = json.loads(Path(source.location).read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(auto_map, dict):
        return None
    names = ", ".join(f"{k} → {v}" for k, v in auto_map.items() if isinstance(v, str))
    return (f"{source.location} names custom code ({names}): set model.trust_remote_code: true "
            "to run it")


def layer_pattern(config) -> tuple[list[str], int]:
    """(one period of the decoder layers' kinds, the number of layers): Gemma-3's 5 sliding-
    window layers to 1 global is (sliding_attention × 5, full_attention), 26 layers deep; a
    model whose layers are all alike is (its one kind, or "same")."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or 0
    kinds = list(getattr(text, "layer_types", None) or ["same"] * layers)
    if len(set(kinds)) <= 1:
        return kinds[:1] or ["same"], layers
    period = next(p for p in range(1, len(kinds) + 1)
                  if all(kinds[i] == kinds[i % p] for i in range(len(kinds))))
    return kinds[:period], layers


def describe_layers(config) -> str:
    """`28 alike`, or `26: (5 sliding, 1 full) ×4 + 2 sliding` (the period's runs of kinds)."""
    period, layers = layer_pattern(config)
    if len(period) == 1:
        return f"{layers} alike"

    def runs(kinds: list[str]) -> str:
        out: list[list] = []
        for kind in kinds:
            short = kind.removesuffix("_attention")
            if out and out[-1][0] == short:
                out[-1][1] += 1
            else:
                out.append([short, 1])
        return ", ".join(f"{n} {kind}" for kind, n in out)

    whole, tail = divmod(layers, len(period))
    return f"{layers}: ({runs(period)}) ×{whole}" + (f" + {runs(period[:tail])}" if tail else "")


def parameter_count(config) -> int:
    """Every parameter of the model a config builds (on meta: nothing allocated), tied ones
    once: a causal LM's, or an image-text-to-text model's (a vision-language model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
        except ValueError:  # not a model this auto class maps
            continue
        return sum(p.numel() for p in model.parameters())
    raise ModelConfigError(f"no causal LM or image-text-to-text model for {config.model_type}")


PUBLISHED = MODEL_DIR / "published.yaml"


def published() -> dict[str, dict]:
    """scenarios/models/published.yaml: each committed real-size config's hub id, its published
    parameter count and where that figure is from."""
    import yaml

    return yaml.safe_load(PUBLISHED.read_text()) or {}


@dataclass(frozen=True)
class Units:
    """A model's decoder layers as alike units, what a simulation assembles a deep model from:
    one layer where the layers are all alike; where their kinds repeat (Gemma-3's 5 sliding-
    window layers to 1 global), one period of them — the last unit then also holds the layers
    past the last whole period (`tail`), which begin the pattern again, as every unit does."""

    size: int  # layers a unit: the period of the layers' kinds
    tail: int  # layers the last unit holds beyond `size`
    count: int  # units in the model

    def layers(self, units: int) -> int:
        """Decoder layers of the same model `units` units deep."""
        return units * self.size + self.tail

    def of(self, layer: int, units: int) -> int:
        """The unit a layer belongs to, in a model `units` units deep."""
        return min(layer // self.size, units - 1)


def layer_units(source: ConfigSource, trust_remote_code: bool = False) -> Units | None:
    """The model's decoder layers as units (Units), or None where it has no layer count."""
    config = load_config(source, trust_remote_code)
    period, layers = layer_pattern(config)
    if not isinstance(layers, int) or layers < 1:
        return None
    return Units(len(period), layers % len(period), layers // len(period))


def build_model(spec: ModelSpec, source: ConfigSource, load: LoadOptions,
                device: torch.device | str):
    """The model, on `device`, weights in `load.dtype` (fp32 when None), in train mode. On meta
    (simulation) pretrained weights are not read: their values do not change memory."""
    import torch

    config = _headed(load_config(source, spec.trust_remote_code), load)
    auto = _auto_class(load.head, config)
    dtype = load.dtype or torch.float32
    common = dict(dtype=dtype, attn_implementation=spec.attn_implementation,
                  trust_remote_code=spec.trust_remote_code)
    if spec.experts is not None:
        common["experts_implementation"] = spec.experts
    if spec.weights == "pretrained" and torch.device(device).type != "meta":
        # A hub id, or the folder holding config.json and the weights.
        where = source.location if source.kind == "hub" else str(Path(source.location).parent)
        if load.quantization is not None:
            common["quantization_config"] = load.quantization
        if load.head == "sequence_classification":
            common["num_labels"] = 1
        model = auto.from_pretrained(where, device_map=str(device), **common)
        if torch.device(device).type == "cpu":
            _own_memory(model)
    elif load.quantization is not None:
        model = _random_quantized(config, load.quantization, torch.device(device), common,
                                  auto)
    else:
        # Under torch.device(...) every parameter is allocated where it will live.
        with torch.device(device):
            model = auto.from_config(config, **common)
    model.config.use_cache = False  # a KV cache is inference memory, not training memory
    model.train()
    return model


def meta_model(spec: ModelSpec, source: ConfigSource, load: LoadOptions | None = None):
    """The model on the meta device: real structure and shapes, no memory, no download."""
    import torch

    dtype = (load.dtype if load else None) or torch.float32
    config = load_config(source, spec.trust_remote_code)
    auto = _auto_class(load.head if load else "causal_lm", config)
    if load is not None:
        config = _headed(config, load)
    more = {"experts_implementation": spec.experts} if spec.experts is not None else {}
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                **more)


def vocab_size(model) -> int:
    """The vocabulary a model's inputs index: its text model's (a multimodal config keeps it
    in `text_config`)."""
    config = model.config
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size


def expert_count(config) -> int | None:
    """A mixture of experts' experts a layer (Mixtral's `num_local_experts`, Qwen-MoE's
    `num_experts`, …), or None for a dense model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        count = getattr(text, name, None)
        if isinstance(count, int) and count > 1:
            return count
    return None


def experts_of(model, routing: str | None = None) -> dict | None:
    """The record's `model.experts` for a mixture of experts (None for a dense model): experts
    a layer, the top_k each token goes to, transformers' implementation, and what its memory
    assumes of routing — nothing for grouped_mm and batched_mm (every buffer holds tokens ×
    top_k rows); eager experts each take only the tokens routed to them: `routing` where a
    simulation had to choose, "as routed" where the router ran on real values."""
    config = model.config
    count = expert_count(config)
    if count is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = getattr(config, "_experts_implementation", None) or "eager"
    if isinstance(implementation, dict):  # per sub-config
        implementation = next(iter(implementation.values()), "eager")
    return {"count": count, "top_k": getattr(text, "num_experts_per_tok", None),
            "implementation": implementation,
            "routing": (routing or "as routed") if implementation == "eager" else "any"}


def _auto_class(head: str, config=None):
    """transformers' auto class for `head`; for a causal LM whose config only an
    image-text-to-text class builds (Qwen2.5-VL), that one: the whole vision-language model,
    which trains on text as its language model does, its vision tower beside it."""
    import transformers

    auto = getattr(transformers, HEADS[head])
    if head == "causal_lm" and config is not None and \
            type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING and \
            type(config) in transformers.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return transformers.AutoModelForImageTextToText
    return auto


def _headed(config, load: LoadOptions):
    """The config for `load.head`: a sequence classifier scores with one label."""
    if load.head == "sequence_classification":
        config.num_labels = 1
    return config


def _random_quantized(config, quantization, device, common: dict, auto):
    """A bitsandbytes-quantized model with random weights, nothing downloaded, as
    `from_pretrained(quantization_config=...)` lays it out: transformers' own quantizer swaps
    the linear layers on a meta skeleton, then each weight is drawn in the compute dtype and
    quantized on the device one layer at a time — never a whole unquantized copy.
    """
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed
        model = auto.from_config(config, **common)
    model.tie_weights()  # from_config under init_empty_weights leaves tied weights apart
    quantizer.preprocess_model(model, device_map={"": device}, dtype=common["dtype"])
    std = getattr(config, "initializer_range", 0.02)
    if device.type == "meta":
        # bitsandbytes caches its double-quant code map in a module global on the device of
        # the first call; made on meta, every later real quantization in this process fails.
        bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
    made: dict[int, torch.nn.Parameter] = {}  # tied weights (LM head = embedding) stay one tensor
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and \
                    weight is not None and weight.device.type == "meta":
                drawn = torch.empty(weight.shape, dtype=common["dtype"], device=device).normal_(0, std)
                if isinstance(module, bnb.nn.Linear4bit):
                    param = bnb.nn.Params4bit(
                        drawn, requires_grad=False, quant_type=quantization.bnb_4bit_quant_type,
                        compress_statistics=quantization.bnb_4bit_use_double_quant,
                        quant_storage=quantization.bnb_4bit_quant_storage)
                    # `.to("meta")` skips quantization; bitsandbytes' own quantize runs on meta
                    # tensors and lays out the packed weight and its state exactly (simulation).
                    module.weight = param._quantize(device) if device.type == "meta" else \
                        param.to(device)
                else:
                    module.weight = bnb.nn.Int8Params(drawn, requires_grad=False,
                                                      has_fp16_weights=False).to(device)
                del drawn  # quantized: the compute-dtype draw goes now
            for name, param in list(module.named_parameters(recurse=False)):
                if param.device.type == "meta" and device.type != "meta":
                    if id(param) not in made:
                        fresh = torch.empty(param.shape, dtype=param.dtype, device=device)
                        fresh.fill_(1.0) if fresh.dim() == 1 else fresh.normal_(0, std)  # norms: 1
                        made[id(param)] = torch.nn.Parameter(fresh,
                                                             requires_grad=param.requires_grad)
                    setattr(module, name, made[id(param)])
    model.to(device)  # the buffers (rotary tables) computed on CPU
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def quantized_weights(model) -> list:
    """The bitsandbytes weights and the tensors of their quantization state (absmax, code, the
    double-quant constants; LLM.int8's row scales): what the quantized base weights occupy."""
    tensors = []
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            tensors.append(param)
            tensors += [state.absmax, state.code]
            if getattr(state, "state2", None) is not None:
                tensors += [state.state2.absmax, state.state2.code]
        elif getattr(param, "SCB", None) is not None:
            tensors += [param, param.SCB]
    return [t for t in tensors if t is not None]


def _own_memory(model) -> None:
    """On CPU, safetensors weights stay memory-mapped from the file: no allocator sees them. A
    GPU holds them in device memory, so copy each one into allocator memory, one at a time."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def parameter_bytes_on_meta(spec: ModelSpec, source: ConfigSource, load: LoadOptions) -> int:
    """Bytes the parameters would take in `load.dtype`, from the model built on meta."""
    return sum(p.numel() * p.element_size() for p in meta_model(spec, source, load).parameters())


# Attention implementations that are not transformers' own eager/SDPA code: what each needs.
_ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def attention_reason(attn: str, device: str) -> str | None:
    """Why `attn` (model.attn_implementation) cannot train on `device` ("cpu", "cuda…" or
    "simulate"), or None. A result (`unsupported`), not bad input: another machine may run it."""
    import importlib.util

    import torch

    if attn == "flex_attention" and device == "cpu":
        return (f"flex_attention has no backward on CPU (torch {torch.__version__}); use sdpa or "
                "eager, or run it on a GPU")
    if attn == "flex_attention" and device == "simulate":
        return "flex_attention's compiled kernels cannot run on fake tensors (the worker crashes)"
    package = _ATTENTION_PACKAGES.get(attn)
    if package is None:
        return None
    if not device.startswith("cuda"):
        return f"{attn} runs only on a CUDA GPU" + (
            " (its kernels cannot run on fake tensors)" if device == "simulate" else "")
    if importlib.util.find_spec(package) is None:
        return f"{attn} needs the {package} package, which is not installed"
    return None


def beyond_positions(source: ConfigSource, seq_len: int,
                     trust_remote_code: bool = False) -> str | None:
    """A warning when `seq_len` exceeds the model's `max_position_embeddings`: memory is still
    what that many tokens take, but the model was not made for them (and a real run with
    pretrained weights would train on positions it never saw)."""
    if source.kind != "file":
        return None
    limit = getattr(load_config(source, trust_remote_code), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        return (f"seq_len {seq_len:,} exceeds the model's max_position_embeddings ({limit:,}): "
                "the figures are for that many tokens, which the model was not configured for")
    return None
