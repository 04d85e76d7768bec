"""Scenario loading: strict validation, one-line errors naming file, variant and key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.scenario import ScenarioError, list_scenarios, load_scenario
from harness.techniques import ordered
from tests.conftest import harness, shipped, shipped_scenarios, write_scenario

GOOD = {
    "name": "s",
    "description": "d",
    "model": {"config": "tiny-llama", "weights": "random", "attn_implementation": "sdpa"},
    "train": {"batch_size": 2, "seq_len": 64, "optimizer": "adamw", "lr": 1e-4, "steps": 1,
              "warmup_steps": 1, "seed": 0},
    "baseline": "full",
    "variants": [
        {"name": "full", "techniques": []},
        {"name": "lora", "techniques": ["bf16", {"lora": {"r": 8, "target_modules": ["q_proj"]}}],
         "train": {"batch_size": 4}},
        {"name": "gc", "techniques": ["gradient_checkpointing", "bf16", {"lora": None}]},
    ],
}


def _write(folder: Path, body, name: str = "s") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.mark.parametrize("path", shipped_scenarios())
def test_every_shipped_scenario_is_valid(path):
    assert list_scenarios(), "no scenarios shipped"
    shipped(path)  # raises ScenarioError where one is not


def test_good_scenario_loads_with_resolved_arguments_and_overrides(tmp_path):
    s = load_scenario(_write(tmp_path, GOOD))
    assert [v.name for v in s.variants] == ["full", "lora", "gc"]
    lora = s.variant("lora")
    assert lora.train.batch_size == 4 and s.variant("full").train.batch_size == 2
    assert lora.train_overrides == {"batch_size": 4}
    args = dict(lora.techniques[1].args)
    assert args["r"] == 8 and args["lora_alpha"] == 8  # PEFT's own default, resolved
    assert len(s.sha256) == 64


def test_technique_order_in_the_yaml_does_not_matter(tmp_path):
    s = load_scenario(_write(tmp_path, GOOD))
    gc = s.variant("gc").techniques
    assert [t.name for t, _ in ordered(gc)] == ["bf16", "lora", "gradient_checkpointing"]
    assert [t.name for t, _ in ordered(tuple(reversed(gc)))] == [t.name for t, _ in ordered(gc)]


def _edit(body, path_keys, value) -> None:
    """Set (or, with _DELETE, remove) the value at a path of keys and indices, in place."""
    target = body
    for key in path_keys[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path_keys[-1]]
    else:
        target[path_keys[-1]] = value


def _mutate(path_keys, value):
    body = copy.deepcopy(GOOD)
    _edit(body, path_keys, value)
    return body


_DELETE = object()

BAD = [
    # (mutation, variant named in the message or None, key named, words in the message)
    ((["modle"], {}), None, "modle", "did you mean 'model'"),
    ((["model", "weights"], "pretrainde"), None, "model.weights", "random, pretrained"),
    ((["model", "config"], "tiny-lama"), None, "model.config", "did you mean 'tiny-llama'"),
    ((["model", "config"], "./nowhere.json"), None, "model.config", "not found"),
    ((["model", "config"], "org/some-model"), None, "model.config", "hub id 'org/some-model'"),
    ((["train", "batch_size"], "2"), None, "train.batch_size", "must be int"),
    ((["train", "seq_len"], 0), None, "train.seq_len", "≥ 2"),
    ((["train", "optimizer"], "adamww"), None, "train.optimizer", "did you mean 'adamw'"),
    ((["train", "lr"], -1.0), None, "train.lr", "> 0"),
    ((["train", "sequence_length"], 5), None, "train.sequence_length", "unknown key"),
    ((["baseline"], "ful"), None, "baseline", "did you mean 'full'"),
    ((["name"], "other"), None, "name", "file stem"),
    ((["variants"], []), None, "variants", "non-empty"),
    ((["variants", 1, "name"], "full"), "full", "variants[1].name", "duplicate"),
    ((["variants", 1, "name"], "a/b"), None, "variants[1].name", "letters"),
    ((["variants", 0, "techniques"], ["bf17"]), "full",
     "variants[0].techniques[0]", "did you mean 'bf16'"),
    ((["variants", 0, "techniques"], ["bf16", "amp_bf16"]), "full",
     "variants[0].techniques[1]", "conflicts"),
    ((["variants", 0, "techniques"], ["bf16", "bf16"]), "full",
     "variants[0].techniques[1]", "twice"),
    ((["variants", 0, "techniques"], [{"lora": {"rank": 8}}]), "full",
     "variants[0].techniques[0].lora.rank",
     "did you mean 'r'"),
    ((["variants", 0, "techniques"], [{"lora": {"r": "8"}}]), "full",
     "variants[0].techniques[0].lora.r",
     "must be int"),
    ((["variants", 0, "techniques"], [{"lora": {"target_modules": ["qkv_proj"]}}]), "full",
     "variants[0].techniques[0].lora", "match no module"),
    ((["variants", 0, "techniques"], [{"bf16": {"x": 1}}]), "full",
     "variants[0].techniques[0].bf16.x",
     "takes no arguments"),
    ((["variants", 0, "techniques"], [{"lora": {}, "bf16": {}}]), "full",
     "variants[0].techniques[0]",
     "one-key mapping"),
    ((["variants", 0, "train"], {"steps": 0}), "full", "variants[0].train.steps", "≥ 1"),
    # Stacks that contradict themselves.
    ((["variants", 0, "techniques"], ["int8"]), "full",
     "variants[0].techniques[0]", "needs one of 'lora'"),
    ((["variants", 0, "techniques"], ["bf16", "chunked_nll", "liger"]), "full",
     "variants[0].techniques[2].liger", "both replace the loss"),
    ((["variants", 0, "techniques"], ["bf16", "chunked_nll", "compile"]), "full",
     "variants[0].techniques[2].compile", "use scope: layers"),
    ((["variants", 0, "techniques"], [{"compile": {"backend": "inductr"}}]), "full",
     "variants[0].techniques[0].compile.backend", "did you mean 'inductor'"),
    ((["variants", 0, "techniques"], [{"compile": {"backend": "aot_eager",
                                                   "mode": "max-autotune"}}]), "full",
     "variants[0].techniques[0].compile.mode", "inductor mode"),
    ((["variants", 0], {"name": "full", "techniques": ["compile"], "train": {"warmup_steps": 0}}),
     "full", "variants[0].train.warmup_steps", "compile needs warmup_steps ≥ 1"),
    ((["variants", 0, "colour"], "red"), "full", "variants[0].colour", "unknown key"),
    # Parallel training: at the top (every variant) or in a variant.
    ((["parallel"], {"strategy": "fsdp", "world_size": 2}), None, "parallel.strategy",
     "one of ddp, fsdp2"),
    ((["parallel"], {"strategy": "fsdp2"}), None, "parallel.world_size", "missing"),
    ((["parallel"], {"strategy": "fsdp2", "world_size": 0}), None, "parallel.world_size", "≥ 1"),
    ((["parallel"], {"strategy": "fsdp2", "world_size": "8"}), None, "parallel.world_size",
     "must be int"),
    ((["parallel"], {"strategy": "fsdp2", "world_size": 2, "reshard": True}), None,
     "parallel.reshard", "allowed: strategy, world_size, reshard_after_forward"),
    ((["variants", 0, "parallel"], {"strategy": "ddp", "world_size": 2,
                                    "reshard_after_forward": False}), "full",
     "variants[0].parallel.reshard_after_forward", "an option of fsdp2, not of ddp"),
    ((["variants", 0, "parallel"], {"strategy": "fsdp2", "world_size": 2,
                                    "param_dtype": "bf16"}), "full",
     "variants[0].parallel.param_dtype",
     "one of float32, bfloat16, float16"),
    ((["variants", 0, "parallel"], {"strategy": "ddp", "world_size": 2, "bucket_cap_mb": 0}),
     "full", "variants[0].parallel.bucket_cap_mb", "> 0"),
    ((["variants", 0, "parallel"], [2]), "full", "variants[0].parallel", "must be a mapping"),
]


@pytest.mark.parametrize("mutation, variant, key, words", BAD, ids=[b[2] + ":" + b[3] for b in BAD])
def test_bad_input_is_one_line_naming_file_variant_and_key(tmp_path, mutation, variant, key, words):
    path = _write(tmp_path, _mutate(*mutation))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(str(path))
    assert f"key {key!r}" in text
    assert words in text
    if variant:
        assert f"variant {variant!r}" in text


@pytest.mark.parametrize("body, words", [
    ("name: s\nmodel: {config: tiny-llama}\nmodel: {config: tiny-llama}\nvariants: [{name: a}]\n",
     "duplicate key 'model'"),
    ("name: s\nvariants: [\n", "not valid YAML"),
    ("!!python/object:os.system {}\n", "not valid YAML"),  # scenario files cannot run code
    ("- just\n- a list\n", "must be a mapping"),
])
def test_malformed_files(tmp_path, body, words):
    with pytest.raises(ScenarioError, match=words):
        load_scenario(_write(tmp_path, body))


def test_model_config_by_relative_path_and_folder(tmp_path):
    config = json.loads((Path(__file__).parent.parent / "scenarios/models/tiny-mistral.json")
                        .read_text())
    (tmp_path / "cfgs" / "m").mkdir(parents=True)
    (tmp_path / "cfgs" / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "cfgs" / "mine.json").write_text(json.dumps(config))
    for ref in ("./cfgs/m", "cfgs/mine.json"):
        body = _mutate(["model", "config"], ref)
        assert load_scenario(_write(tmp_path, body)).model.config == ref


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, cli):
    path = _write(tmp_path, _mutate(["variants", 0, "techniques"], ["lorra"]), name="s")
    out = tmp_path / "out"
    for args in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert "variant 'full'" in lines[0] and "did you mean 'lora'" in lines[0]
    assert not out.exists()


def test_cli_bad_flags_exit_2(tmp_path, cli):
    path = write_scenario(tmp_path, "s", [{"name": "a"}])
    for extra in (["--variant", "b"], ["--memory-budget", "lots"], ["--steps", "0"],
                  ["--timeout", "nan"], ["--timeout", "-5"], ["--colour", "red"]):
        proc = cli("run", str(path), "--out", str(tmp_path / "out"), *extra)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_command_exits_2_with_one_line_on_bad_input(tmp_path):
    """The process a user starts: `python -m harness` gives main()'s exit code, no traceback."""
    path = _write(tmp_path, _mutate(["variants", 0, "techniques"], ["lorra"]), name="s")
    proc = harness("validate", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "did you mean 'lora'" in proc.stderr


# Property: whatever the file holds, the loader answers with a Scenario or a one-line
# ScenarioError — never another exception.

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                  st.text(max_size=12), st.sampled_from(["bf16", "lora", "q_proj", "adamw",
                                                         "tiny-llama", "full", "r", "sdpa"]))
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8) | st.sampled_from(
        ["r", "lora", "name", "techniques", "train", "steps"]), inner, max_size=3)), max_leaves=8)


def _paths(body, prefix=()):
    yield prefix
    if isinstance(body, dict):
        for k, v in body.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(body, list):
        for i, v in enumerate(body):
            yield from _paths(v, (*prefix, i))


_ALL_PATHS = [p for p in _paths(GOOD) if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(_ALL_PATHS), st.one_of(st.just(_DELETE), _value)),
                      min_size=1, max_size=3))
def test_property_malformed_scenarios_never_raise_anything_else(tmp_path, edits):
    body = copy.deepcopy(GOOD)
    for path, value in edits:
        try:
            _edit(body, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this path
    file = _write(tmp_path, body)
    try:
        load_scenario(file)
    except ScenarioError as e:
        assert "\n" not in str(e) and str(e).startswith(str(file))


@pytest.mark.parametrize("key,value,needle", [
    ("lr", float("nan"), "finite"), ("lr", float("inf"), "finite"),
    ("weight_decay", float("nan"), "finite"), ("max_grad_norm", float("inf"), "finite"),
    ("max_grad_norm", float("nan"), "finite"), ("seq_len", 1, "≥ 2"),
    ("seed", 2 ** 64, "2**64"), ("seed", -1, "≥ 0"), ("lr", "1e-4", "1.0e-4"),
])
def test_bad_train_values_are_refused_naming_the_key(tmp_path, key, value, needle):
    body = copy.deepcopy(GOOD)
    body["train"][key] = value
    with pytest.raises(ScenarioError) as e:
        load_scenario(_write(tmp_path, body))
    assert e.value.key == f"train.{key}" and needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["0", "-5", "nan", "inf", "x"])
def test_cli_timeout_must_be_a_positive_number(text, capsys):
    import argparse

    from harness.cli import _timeout
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive number of seconds"):
        _timeout(text)


def test_leading_zero_int_is_refused(tmp_path):
    text = yaml.safe_dump(GOOD, sort_keys=False).replace("batch_size: 2", "batch_size: 010")
    with pytest.raises(ScenarioError, match="write 10 or 0o10"):
        load_scenario(_write(tmp_path, text))


def test_deep_nesting_is_an_error_not_a_recursion(tmp_path):
    with pytest.raises(ScenarioError, match="nested too deeply"):
        load_scenario(_write(tmp_path, "x: " + "[" * 10000))
