"""Vision-language models with images in their batches (images.py): the tokens and pixel values
the models' own image processors make, the image encoder frozen or trained, and the step
measured on CPU against its simulation, where the batch's values decide shapes.

Fast: what a scenario may say of images, what the processors make, what trains; one CPU step
and its simulation. Slow: every variant of two tiny families, measured and simulated.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness.images import encoder_name, make_images, place
from harness.models import load_config, resolve_config
from harness.scenario import ScenarioError, load_scenario
from tests.conftest import REPO, measured_variants, write_scenario

QWEN, GEMMA, LLAVA, QWEN3 = "tiny-qwen2.5-vl", "tiny-gemma3-vl", "tiny-llava", "tiny-qwen3-vl"
TRAIN = {"batch_size": 2, "seq_len": 160, "steps": 1, "warmup_steps": 1}
IMAGE = {"count": 1, "height": 224, "width": 224}
LORA = {"lora": {"r": 8, "target_modules": "all-linear"}}


def _config(name: str):
    spec = SimpleNamespace(config=name, weights="random")
    source = resolve_config(spec, REPO / "scenarios" / "x.yaml")
    return load_config(source), source.location


def _images(name: str, count=1, height=224, width=224, batch=1):
    config, path = _config(name)
    return make_images(SimpleNamespace(count=count, height=height, width=width), batch,
                       config, path)


def _error(tmp_path, variants, model=QWEN, **top) -> ScenarioError:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write_scenario(tmp_path, "vl", variants, model={"config": model},
                                     train=TRAIN, **top))
    return caught.value


def test_qwen_images_take_the_processors_grid_of_merged_patches():
    """Qwen2.5-VL's processor resizes to multiples of 28 pixels within its committed
    max_pixels (12,845,056, the checkpoint's, not the class's 1,003,520) and merges 2 × 2
    patches of 14 into a token: 1024² becomes 1036², 74² patches, 37² = 1,369 tokens, between
    <|vision_start|> and <|vision_end|>; each patch's pixels a row of 3 × 2 × 14² values."""
    images = _images("qwen2.5-vl-7b", height=1024, width=1024, batch=2)
    assert images.layout.tokens == 37 * 37
    assert images.tokens_per_sample() == 37 * 37 + 2
    assert tuple(images.pixels["pixel_values"].shape) == (2 * 74 * 74, 3 * 2 * 14 * 14)
    assert images.pixels["image_grid_thw"].tolist() == [[1, 74, 74]] * 2
    assert images.text_ids == 151652  # the text is drawn below every vision token


def test_a_recipes_max_pixels_bounds_a_qwen_images_tokens(tmp_path):
    """`max_pixels` (Qwen-VL's own setting, as recipes set it) over the checkpoint's: 1024² at
    the class default's 1,003,520 becomes 980², 35² tokens; for Gemma-3, which resizes every
    image to 896², it is refused."""
    config, path = _config("qwen2.5-vl-7b")
    spec = SimpleNamespace(count=1, height=1024, width=1024, min_pixels=None,
                           max_pixels=1003520)
    assert make_images(spec, 1, config, path).layout.tokens == 35 * 35
    error = _error(tmp_path, [{"name": "v"}], GEMMA,
                   images={**IMAGE, "max_pixels": 1003520})
    assert error.key == "images" and "Qwen-VL processor's setting" in error.message


def test_gemma_images_are_resized_to_the_encoders_size_and_pooled():
    """Gemma-3's processor resizes any image to its SigLIP's 896² and the model pools its
    patches to mm_tokens_per_image (256), whatever the size asked; a sample's two images
    are two pixel tensors and two blocks of tokens."""
    small = _images("gemma-3-4b", count=2, height=300, width=500, batch=3)
    large = _images("gemma-3-4b", count=2, height=2000, width=1000, batch=3)
    for images in (small, large):
        assert images.layout.tokens == 256
        assert images.tokens_per_sample() == 2 * 258
        assert tuple(images.pixels["pixel_values"].shape) == (6, 3, 896, 896)
        assert images.layout.type_ids == "token_type_ids"


def test_qwen3_images_merge_patches_of_16_and_carry_their_modality_ids():
    """Qwen3-VL's patches are 16 pixels (32 a merged token) and its processor returns
    `mm_token_type_ids`, which its model requires for its 3-D positions: 1024² is 32² tokens."""
    images = _images("qwen3-vl-4b", height=1024, width=1024)
    assert images.layout.tokens == 32 * 32
    assert tuple(images.pixels["pixel_values"].shape) == (64 * 64, 3 * 2 * 16 * 16)
    assert images.layout.type_ids == "mm_token_type_ids"


def test_llava_images_are_the_patches_its_encoder_hands_on():
    """LLaVA-1.5's processor pads and resizes any image to its CLIP's 336² and the model hands
    on one feature per 14² patch (the class token dropped): 576 `<image>` tokens, nothing
    around them."""
    images = _images("llava-1.5-7b", height=1024, width=768, batch=2)
    assert images.layout.tokens == images.tokens_per_sample() == 24 * 24
    assert tuple(images.pixels["pixel_values"].shape) == (2, 3, 336, 336)
    assert images.text_ids == 32000


def test_a_row_starts_with_its_images_which_have_no_label():
    images = _images(GEMMA, count=2)
    ids = torch.full((2, 64), 7)
    batch = place(ids, images)
    block = images.layout.block
    assert ids[0, 0] == images.layout.start and ids[0, block - 1] == images.layout.end
    assert (ids[:, 1:block - 1] == images.layout.image).all()
    assert (batch["labels"][:, :2 * block] == -100).all()
    assert (batch["labels"][:, 2 * block:] == 7).all()
    assert int(batch["token_type_ids"].sum()) == 2 * 2 * images.layout.tokens


@pytest.mark.parametrize(("variants", "top", "model", "key", "says"), [
    ([{"name": "v"}], {"images": IMAGE}, "tiny-llama", "images", "no vision tower"),
    ([{"name": "v", "train": {"seq_len": 60}}], {"images": IMAGE}, QWEN, "train.seq_len",
     "take 66 tokens"),
    ([{"name": "v", "generate": {"prompt_len": 8, "max_new_tokens": 2}}], {"images": IMAGE},
     QWEN, "generate", "not built"),
    ([{"name": "v", "eval": {"seq_len": 40}}], {"images": IMAGE}, QWEN, "eval.seq_len",
     "beside the images' 66"),
    ([{"name": "v", "objective": "dpo", "techniques": [LORA]}], {"images": IMAGE}, QWEN,
     "images", "dpo with images"),
    ([{"name": "v", "model": {"train_vision": True}}], {}, "tiny-llama", "model.train_vision",
     "no image encoder"),
    ([{"name": "v"}], {"images": {"count": 1, "height": 224}}, QWEN, "images.width",
     "missing"),
])
def test_what_images_cannot_be_is_bad_input(tmp_path, variants, top, model, key, says):
    error = _error(tmp_path, variants, model, **top)
    assert error.key.endswith(key) and says in error.message, str(error)


def test_the_image_encoder_trains_only_when_asked(tmp_path):
    """train_vision false (the default): a full fine-tune leaves the encoder's weights frozen
    and LoRA on all-linear puts no adapter in it (PEFT's exclude_modules); true: both train
    it, and the encoder's activations are kept for its backward."""
    from harness.train import build

    scenario = load_scenario(write_scenario(tmp_path, "vl", [
        {"name": "full"}, {"name": "full-vision", "model": {"train_vision": True}},
        {"name": "lora", "techniques": [LORA]},
        {"name": "lora-vision", "techniques": [LORA], "model": {"train_vision": True}}],
        model={"config": QWEN}, train=TRAIN, images=IMAGE))
    trained, targets = {}, {}
    for variant in scenario.variants:
        spec = scenario.model_of(variant)
        ctx = build(spec, resolve_config(spec, scenario.path), variant.techniques,
                    torch.device("meta"))
        trained[variant.name] = {name for name, p in ctx.model.named_parameters()
                                 if p.requires_grad}
        targets[variant.name] = ctx.resolved.get("lora", {}).get("target_modules")
    # The record names the modules that hold an adapter, not every linear PEFT considered.
    assert "qkv" not in targets["lora"] and "qkv" in targets["lora-vision"]
    encoder = "model.visual."
    assert not any(encoder in name for name in trained["full"])
    assert {n for n in trained["full-vision"] if encoder in n} and \
        trained["full"] == {n for n in trained["full-vision"] if encoder not in n}
    assert not any(encoder in name for name in trained["lora"])
    assert any(encoder in name and "lora_" in name for name in trained["lora-vision"])
    assert trained["lora"] == {n for n in trained["lora-vision"] if encoder not in n}
    assert encoder_name(ctx.model) == "base_model.model.model.visual"


def test_the_simulated_step_follows_the_batchs_values_and_agrees_with_the_cpu(tmp_path):
    """Qwen2.5-VL reads its batch's values before any weight: where the images are in the
    token ids, each image's patch grid (positions, attention windows, sequence boundaries).
    The simulation carries the values of the batch it made through those ops (probes/
    values.py) and holds the CPU step's figures, and its evaluation's (batches of 2, with
    their images); a frozen encoder without checkpointing keeps nothing for backward."""
    _, got = measured_variants(tmp_path, "vl", [{"name": "lora", "techniques": [LORA]}],
                               model={"config": QWEN}, train={**TRAIN, "batch_size": 1},
                               images=IMAGE, eval={"batches": 1, "batch_size": 2})
    real, sim = got["lora", False], got["lora", True]
    for phase in ("forward", "backward", "optimizer", "eval"):
        figures = real.memory["phases"][phase]
        scratch = figures["breakdown_bytes"]["unattributed"]
        assert sim.memory["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            figures["peak_allocated_bytes"] - scratch, rel=0.01), phase
    assert real.memory["breakdown_bytes"]["vision_activations"] == 0 == \
        sim.memory["breakdown_bytes"]["vision_activations"]
    assert sim.result.vision == real.result.vision == {
        "module": "model.visual", "params": real.result.vision["params"], "trained": False}


VARIANTS = [{"name": "lora", "techniques": [LORA]},
            {"name": "full-vision", "model": {"train_vision": True}},
            {"name": "lora-gc", "techniques": [LORA, "gradient_checkpointing"]}]
# Qwen2.5-VL (windowed and full attention, 3-D positions from the ids) every variant; Gemma-3
# (interleaved sliding and global layers, bidirectional image tokens) and LLaVA (CLIP, a
# projector) with their frozen encoder's checkpointed backward; Qwen3-VL (deepstack: image
# features added into early decoder layers at the image positions) with its encoder trained.
FAMILIES = {QWEN: VARIANTS, GEMMA: VARIANTS[2:], LLAVA: VARIANTS[2:], QWEN3: VARIANTS[1:2]}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return {}


def _family(families, tmp_path_factory, name):
    if name not in families:
        _, families[name] = measured_variants(
            tmp_path_factory.mktemp(name), "vl", FAMILIES[name], model={"config": name},
            train=TRAIN, images=IMAGE)
    return families[name]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "name"), [(m, v["name"]) for m, vs in FAMILIES.items()
                                             for v in vs])
def test_each_family_simulated_agrees_with_the_cpu_step_within_one_percent(
        families, tmp_path_factory, model, name):
    family = _family(families, tmp_path_factory, model)
    real, sim = family[name, False], family[name, True]
    for phase in ("forward", "backward", "optimizer"):
        figures = real.memory["phases"][phase]
        scratch = figures["breakdown_bytes"]["unattributed"]
        assert sim.memory["phases"][phase]["peak_allocated_bytes"] == pytest.approx(
            figures["peak_allocated_bytes"] - scratch, rel=0.01), phase
        assert sim.memory["phases"][phase]["breakdown_bytes"]["vision_activations"] == \
            figures["breakdown_bytes"]["vision_activations"], phase


@pytest.mark.slow
def test_checkpointing_makes_a_frozen_encoder_keep_activations(families, tmp_path_factory):
    """transformers' activation_checkpointing_enable calls enable_input_require_grads, which
    hooks every sub-model's input embeddings — the image encoder's patch embedding too — so
    its output requires grad: under checkpointing a frozen encoder keeps its (checkpointed)
    activations and runs backward, which it does not without. Trained, it keeps more."""
    family = _family(families, tmp_path_factory, QWEN)
    vision = {name: family[name, False].memory["breakdown_bytes"]["vision_activations"]
              for name in ("lora", "lora-gc", "full-vision")}
    assert vision["lora"] == 0 < vision["lora-gc"] < vision["full-vision"]


def test_a_hub_ids_images_follow_its_cached_preprocessor_config(tmp_path, monkeypatch):
    """`config: org/name` takes its image processor's settings from the checkpoint's
    preprocessor_config.json in the hub cache (fetched beside config.json when online): a
    max_pixels of 200,704 caps a 1024² image at 16² merged tokens, where the class default
    (1,003,520) would give 35²."""
    import json

    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-vl"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (snapshot / "config.json").write_text(
        (REPO / "scenarios" / "models" / f"{QWEN}.json").read_text())
    (snapshot / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 200704, "patch_size": 14, "temporal_patch_size": 2,
         "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(write_scenario(tmp_path, "vl", [{"name": "v"}],
                                     model={"config": "acme/tiny-vl"},
                                     train={**TRAIN, "seq_len": 200},
                                     images={"count": 1, "height": 1024, "width": 1024}))
    assert "take 258 tokens (256 each" in caught.value.message  # 16² + start and end


def test_the_encoder_is_found_where_get_encoder_has_no_modality(monkeypatch):
    """transformers 5.17 (the GPU machines' own) has `get_encoder()` without `modality`: the
    encoder is then looked up by transformers' own names for it."""
    from transformers import PreTrainedModel

    from harness.images import vision_encoder
    from harness.models import build_model
    from harness.techniques import LoadOptions

    spec = SimpleNamespace(config=QWEN, weights="random", attn_implementation="sdpa",
                           trust_remote_code=False, experts=None)
    model = build_model(spec, resolve_config(spec, REPO / "scenarios" / "x.yaml"),
                        LoadOptions(), "meta")
    found = vision_encoder(model)
    monkeypatch.setattr(PreTrainedModel, "get_encoder", lambda self: self)
    assert vision_encoder(model) is found is model.model.visual
