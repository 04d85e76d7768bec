"""Images in a vision-language model's training batches: `images: {count, height, width}`
per sample becomes what the model's processor would hand the model — the image processor's
own pixel values (and Qwen-VL's patch grid), and in the text each image's placeholder tokens,
as many as the processor inserts for an image of that size.

The image processor is transformers' own, built without files: its class is the one
transformers maps the model type to (the PIL backend, which needs no torchvision), its
settings those of the checkpoint's `preprocessor_config.json` where one lies beside the
config (Qwen2.5-VL-7B's is committed: its max_pixels, 12,845,056, is not the class's default
of 1,003,520), else what the model's vision config fixes (Qwen-VL's patch, temporal patch and
merge sizes; SigLIP's image size for Gemma-3) on top of the class's defaults. The images themselves
are black: pixel values' shapes, not their values, decide memory.

How a family's processor lays an image into the text (`Layout`) is the one thing written here
rather than called: the processors need a tokenizer (files) to run. Each layout below is its
processor's, read from its source (transformers 5): Qwen2-VL and Qwen2.5-VL put
`<|vision_start|>`, grid_t × grid_h × grid_w / merge_size² `<|image_pad|>` and `<|vision_end|>`;
Gemma-3 puts `<start_of_image>`, `mm_tokens_per_image` image tokens and `<end_of_image>`, and
marks the image tokens in `token_type_ids` (the model attends among them bidirectionally);
the Qwen processors of transformers 5.2x mark them in `mm_token_type_ids` (Qwen3-VL's model
requires it for its 3-D positions), older ones return none;
LLaVA puts one `<image>` per feature its encoder hands on (a patch each, CLIP's class token
dropped by the default strategy: 576 for LLaVA-1.5's 336² CLIP), nothing around them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Model types whose processor's image layout is written out here (layout_of); every image of
# a batch has the one size asked, so one image's layout is every image's.
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "llava")
_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class ImagesError(ValueError):
    """The model cannot take images as asked: bad input, said in one line."""


@dataclass(frozen=True)
class Layout:
    start: int | None  # the token before an image's placeholders
    image: int  # the placeholder token, repeated `tokens` times
    end: int | None  # the token after them
    tokens: int  # placeholders per image
    # The key of the per-token modality ids the processor returns, 1 at the placeholders
    # (Gemma-3: token_type_ids; Qwen: mm_token_type_ids); None: it returns none.
    type_ids: str | None

    @property
    def block(self) -> int:
        """Tokens an image takes in the text, its start and end tokens included."""
        return self.tokens + (self.start is not None) + (self.end is not None)


@dataclass
class Images:
    """What a micro-batch's images are, made once on the host: pixel values and patch grids
    for every image of the micro-batch, in order (sample by sample), and the layout of each."""

    layout: Layout
    count: int  # images per sample
    pixels: dict[str, torch.Tensor]  # the processor's outputs the model takes
    processor: str  # the image processor's class, as the record says
    text_ids: int  # the text's tokens are drawn below this: no image or video token among them

    def tokens_per_sample(self) -> int:
        return self.count * self.layout.block

    def record(self) -> dict[str, Any]:
        """What the processor made, beside what was asked in the record's `images`."""
        return {"processor": self.processor, "tokens_per_image": self.layout.tokens,
                "tokens_per_sample": self.tokens_per_sample(),
                "pixel_values_shape": list(self.pixels["pixel_values"].shape)}


def vision_encoder(model):
    """The model's image encoder — transformers' own lookup (`get_encoder(modality="image")`:
    `visual`, `vision_tower`, …) through PEFT's wrapper — or None for a text-only model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        encoder = inner.get_encoder(modality="image")
    except TypeError:  # transformers before `modality` (5.17): its names, looked up as it does
        encoder = next((getattr(m, name) for m in (inner, getattr(inner, "model", None))
                        for name in _ENCODERS if m is not None and hasattr(m, name)), None)
    except (AttributeError, ValueError):  # no get_encoder: not transformers' model
        return None
    if encoder is None or encoder is inner or encoder is getattr(inner, "base_model", None):
        return None
    return encoder


# transformers' names of an image encoder (PreTrainedModel.get_encoder, modality "image").
_ENCODERS = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_tower")


def encoder_name(model) -> str | None:
    """The module path of the image encoder within `model` (`model.visual`), or None."""
    encoder = vision_encoder(model)
    if encoder is None:
        return None
    return next((name for name, module in model.named_modules() if module is encoder), None)


def has_vision(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def layout_of(config, pixels: dict[str, torch.Tensor], merge_size: int | None) -> Layout:
    """How the family's processor lays one image into the text (module docstring)."""
    kind = config.model_type
    if kind in _QWEN:
        grid = pixels["image_grid_thw"][0]
        return Layout(start=config.vision_start_token_id, image=config.image_token_id,
                      end=config.vision_end_token_id,
                      tokens=int(grid.prod()) // merge_size ** 2,
                      type_ids="mm_token_type_ids" if _returns_type_ids(kind) else None)
    if kind == "gemma3":
        return Layout(start=config.boi_token_index, image=config.image_token_index,
                      end=config.eoi_token_index, tokens=config.mm_tokens_per_image,
                      type_ids="token_type_ids")
    if kind == "llava":
        height, width = pixels["pixel_values"].shape[-2:]
        patch = config.vision_config.patch_size
        # The encoder's features: a patch each, and CLIP's class token, which the default
        # strategy drops (LlavaProcessor's num_additional_image_tokens).
        cls = config.vision_config.model_type == "clip_vision_model"
        default = config.vision_feature_select_strategy == "default"
        return Layout(start=None, image=config.image_token_id, end=None,
                      tokens=(height // patch) * (width // patch) + cls - default,
                      type_ids=None)
    raise ImagesError(f"{kind}: images are built for {', '.join(FAMILIES)} only")


def _returns_type_ids(model_type: str) -> bool:
    """Whether the family's processor returns `mm_token_type_ids` by default (transformers
    5.2x: `return_mm_token_type_ids`)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if not name:
        return False
    import transformers

    return bool(getattr(getattr(transformers, name, None), "return_mm_token_type_ids", False))


def image_processor(config, config_path: str | None, hub: str | None = None,
                    overrides: dict | None = None):
    """transformers' image processor for the model (module docstring); `hub`: the hub id the
    config came from, whose preprocessor config is fetched with it."""
    from transformers.models.auto.image_processing_auto import (
        IMAGE_PROCESSOR_MAPPING_NAMES,
        get_image_processor_class_from_name,
    )

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not names:
        raise ImagesError(f"{config.model_type}: transformers maps no image processor to it")
    # {backend: class} (transformers 5.2x); (slow, fast) before: the slow one is PIL's.
    name = names.get("pil") if isinstance(names, dict) else \
        names[0] if isinstance(names, (tuple, list)) else names
    cls = get_image_processor_class_from_name(name) if name else None
    if cls is None:
        raise ImagesError(f"{config.model_type}: its image processor {names} is not installed")
    settings = _preprocessor_config(config_path, hub)
    if settings is None:
        settings = _from_vision_config(config)
    settings = {k: v for k, v in settings.items()
                if k not in ("image_processor_type", "processor_class", "auto_map")}
    return cls(**{**settings, **(overrides or {})})


def _preprocessor_config(config_path: str | None, hub: str | None = None) -> dict | None:
    """The checkpoint's `preprocessor_config.json`: a committed config's as
    `preprocessors/<name>.json` beside it, a `config.json`'s in its folder (the hub's layout),
    a hub id's from the hub cache or fetched (`hub`); None where there is none."""
    path = None
    if config_path is not None:
        config = Path(config_path)
        path = config.with_name("preprocessor_config.json") if config.name == "config.json" \
            else config.parent / "preprocessors" / config.name
    if (path is None or not path.is_file()) and hub is not None:
        from harness.models import hub_file

        fetched = hub_file(hub, "preprocessor_config.json", required=False)
        path = Path(fetched) if fetched else path
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _from_vision_config(config) -> dict[str, Any]:
    """What the model's vision config fixes of its image processor's settings."""
    vision = config.vision_config
    if config.model_type in _QWEN:
        return {"patch_size": vision.patch_size, "temporal_patch_size":
                vision.temporal_patch_size, "merge_size": vision.spatial_merge_size}
    if config.model_type == "gemma3":
        return {"size": {"height": vision.image_size, "width": vision.image_size}}
    if config.model_type == "llava":  # CLIP's: the short side resized, the centre cropped
        return {"size": {"shortest_edge": vision.image_size},
                "crop_size": {"height": vision.image_size, "width": vision.image_size}}
    return {}


def make_images(spec, batch_size: int, config, config_path: str | None,
                hub: str | None = None) -> Images:
    """A micro-batch's images (`spec`: scenario.ImagesSpec), through the image processor:
    Qwen-VL's with the spec's min_pixels/max_pixels over its own."""
    import numpy as np

    if not has_vision(config):
        raise ImagesError(f"{config.model_type} has no vision tower to take images")
    if config.model_type not in FAMILIES:
        raise ImagesError(f"{config.model_type}: images are built for {', '.join(FAMILIES)} "
                          "only")
    bounds = {k: getattr(spec, k, None) for k in ("min_pixels", "max_pixels")}
    bounds = {k: v for k, v in bounds.items() if v is not None}
    if bounds and config.model_type not in _QWEN:
        raise ImagesError(f"{', '.join(bounds)}: a Qwen-VL processor's setting; "
                          f"{config.model_type}'s resizes every image to its encoder's size")
    processor = image_processor(config, config_path, hub, bounds)
    picture = np.zeros((spec.height, spec.width, 3), dtype=np.uint8)
    out = processor(images=[picture] * (batch_size * spec.count), return_tensors="pt")
    pixels = {k: v for k, v in out.items() if k in ("pixel_values", "image_grid_thw")}
    layout = layout_of(config, pixels, getattr(processor, "merge_size", None))
    special = [layout.image, layout.start, layout.end] + [
        getattr(config, name, None) for name in ("video_token_id", "vision_token_id")]
    return Images(layout, spec.count, pixels, type(processor).__name__,
                  min(i for i in special if isinstance(i, int)))


def place(ids: torch.Tensor, images: Images) -> dict[str, torch.Tensor]:
    """Each row's images at its start, one after the other, as a chat template puts them
    before the question: their tokens in `ids` (host tensors, changed in place) and what the
    model takes beside them — labels -100 over the images (no loss on them, as TRL's
    vision-language collator masks them), and the modality ids where the processor returns
    them (Layout.type_ids)."""
    layout = images.layout
    labels = ids.clone()
    types = torch.zeros_like(ids) if layout.type_ids else None
    at = 0
    for _ in range(images.count):
        if layout.start is not None:
            ids[:, at] = layout.start
            at += 1
        ids[:, at:at + layout.tokens] = layout.image
        if types is not None:
            types[:, at:at + layout.tokens] = 1
        at += layout.tokens
        if layout.end is not None:
            ids[:, at] = layout.end
            at += 1
    labels[:, :at] = -100
    batch = {"labels": labels}
    if types is not None:
        batch[layout.type_ids] = types
    return batch
