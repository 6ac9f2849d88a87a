"""``plop check`` bounded on hostile configs: each is refused with exit 2 and one line naming the
problem, by the real CLI in a process held to 500 MB of address space (``RLIMIT_AS``); and the
config.json forms that used to crash or mislead (transformers' non-finite floats, no
``architectures``) are read as transformers and the stacks read them.

The address-space limit is below what importing torch maps (about 640 MB), so passing also proves
each refusal comes before the model is built. Wall time and peak RSS of each run are printed
(``pytest -s``), not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from plop.audit import EXIT_CLEAN, check, inline_spec
from plop.audit.meta import meta_model
from plop.audit.size import MAX_MODULES, MAX_PARAMETERS, check_size, estimate
from plop.errors import ModelError
from test_cli import ENV, PLOP, one_line_error

FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
LLAMA = FIXTURES / "Llama-3.1-8B.json"
MEMORY = 500 * 1024 * 1024
CPU_SECONDS = 5  # a bound that ends a runaway as the old code ran (the 10M-layer build), not a timing


# Runs ARGV under the limits and writes its peak RSS and exit status to OUT. A child's peak RSS
# counts the memory of the process it was forked from, so the fork is made from this small
# interpreter (about 10 MB), not from pytest (hundreds).
_MEASURE = """
import json, os, resource, subprocess, sys, time
out, memory, cpu, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def limit():
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
start = time.perf_counter()
proc = subprocess.Popen(argv, preexec_fn=limit)
_, status, usage = os.wait4(proc.pid, 0)
with open(out, "w") as f:
    json.dump({"seconds": time.perf_counter() - start, "peak_rss": usage.ru_maxrss * 1024}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def bounded_check(*args: str | Path) -> subprocess.CompletedProcess:
    """``plop check ARGS`` under 500 MB of address space and 5 s of CPU; wall time and peak RSS printed."""
    with tempfile.NamedTemporaryFile(suffix=".json") as measured:
        measure = [sys.executable, "-I", "-S", "-c", _MEASURE, measured.name, str(MEMORY), str(CPU_SECONDS)]
        proc = subprocess.run([*measure, *PLOP, "check", *map(str, args)], capture_output=True, text=True, env=ENV,
                              timeout=120)
        usage = json.loads(Path(measured.name).read_text())
    print(f"plop check {' '.join(map(str, args))[-60:]}: exit {proc.returncode}, {usage['seconds']:.2f} s, "
          f"peak RSS {usage['peak_rss'] / 2**20:.0f} MB")
    assert usage["peak_rss"] < MEMORY
    return proc


def model_config(tmp_path: Path, base: Path = LLAMA, **changes) -> Path:
    """A published config.json with ``changes``: a dict merged into the nested config of its key,
    None removing the key."""
    data = json.loads(base.read_text())
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return path


# -- absurd sizes, refused before the build ------------------------------------------------------
@pytest.mark.spawns
@pytest.mark.parametrize("changes, base, line", [
    ({"num_hidden_layers": 10_000_000}, LLAMA,
     "num_hidden_layers = 10,000,000 makes a model of about 2.4e+15 parameters, over the 1.0e+13"),
    ({"vocab_size": 1e15}, LLAMA, "vocab_size = 1.0e+15 makes a model of about 8.2e+18 parameters"),
    ({"vocab_size": 10**4000}, LLAMA, "vocab_size = 1.0e+4000"),
    ({"text_config": {"num_hidden_layers": 10**9}}, FIXTURES / "gemma-3-4b-it.json",
     "text_config.num_hidden_layers = 1,000,000,000"),
    ({"num_hidden_layers": 200_000, "hidden_size": 64, "intermediate_size": 128},
     LLAMA, "num_hidden_layers = 200,000 makes a model of about 3,200,000 modules, over the 300,000"),
    ({"n_routed_experts": 10**6}, FIXTURES / "DeepSeek-V3.json", "n_routed_experts = 1,000,000"),
    ({"num_hidden_layers": float("inf")}, LLAMA, "num_hidden_layers = inf is not a size"),
])
def test_absurd_size_refused_naming_the_field(tmp_path, changes, base, line):
    error = one_line_error(bounded_check("--target-modules", "q_proj", model_config(tmp_path, base, **changes)))
    assert line in error


@pytest.mark.heavy
def test_real_models_estimate_near_their_built_size_and_pass():
    """The caps are far from every published config, and the estimate is near the built model."""
    for path in sorted(FIXTURES.glob("*.json")):
        data = json.loads(path.read_text())
        built = sum(p.numel() for p in meta_model(path).parameters())
        found = check_size(data, path.name)
        assert 0.5 < found.parameters / built < 1.5, path.name
        assert found.parameters < MAX_PARAMETERS / 10 and found.modules < MAX_MODULES / 5
    # Llama-4-Behemoth size (about 2e12): DeepSeek-V3 with three times its experts
    behemoth = json.loads((FIXTURES / "DeepSeek-V3.json").read_text()) | {"n_routed_experts": 768}
    assert 1.5e12 < check_size(behemoth, "behemoth").parameters < MAX_PARAMETERS


def test_estimate_names_the_furthest_field():
    data = json.loads(LLAMA.read_text()) | {"text_config": {"num_hidden_layers": 5000, "hidden_size": 8192}}
    found = estimate(data)
    assert found.fields["text_config.num_hidden_layers"] == ("layers", 5000)
    assert found.culprit() == "text_config.num_hidden_layers"


# -- regexes, before the build ---------------------------------------------------------------
@pytest.mark.spawns
def test_unsafe_regexes_refused_before_building_deepseek(tmp_path):
    """DeepSeek-V3 takes seconds and torch to build: under the limit only a refusal before it fits."""
    deepseek = FIXTURES / "DeepSeek-V3.json"
    assert "nests unbounded repeats" in one_line_error(bounded_check("--target-modules", "(.*a+)+$", deepseek))
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"r": 8, "target_modules": ["q_proj"], "rank_pattern": {"(a|aa)+$": 4}}))
    assert "backtracks" in one_line_error(bounded_check(adapter, deepseek))
    adapter.write_text(json.dumps({"r": 8, "target_modules": "(q_proj"}))
    assert "is not a valid regex" in one_line_error(bounded_check(adapter, deepseek))


# -- nesting and aliases -----------------------------------------------------------------------
@pytest.mark.spawns
def test_deep_json_config_model_config_and_report(tmp_path):
    config = tmp_path / "adapter_config.json"
    config.write_text("[" * 5000 + "]" * 5000)
    error = one_line_error(bounded_check(config, LLAMA))
    assert "nests lists and objects 5,000 levels deep, over the 100 allowed" in error
    deep_model = tmp_path / "config.json"
    deep = "[" * 5000 + "]" * 5000
    deep_model.write_text(LLAMA.read_text().replace('"rope_scaling": {', f'"rope_scaling": {deep}, "rope": {{'))
    assert "config.json: nests lists and objects 5,001 levels deep" in one_line_error(
        bounded_check("--target-modules", "q_proj", deep_model))
    report = tmp_path / "report.json"
    report.write_text(deep)
    assert "report.json: nests lists and objects 5,000 levels deep" in one_line_error(
        bounded_check("--target-modules", "q_proj", LLAMA, "--report", report))


@pytest.mark.spawns
def test_deep_yaml(tmp_path):
    config = tmp_path / "axolotl.yml"
    config.write_text("adapter: lora\nlora_target_modules: " + "[" * 3000 + "]" * 3000 + "\n")
    assert "nests lists and mappings over 100 levels deep (line 2)" in one_line_error(bounded_check(config, LLAMA))


BILLION_LAUGHS = "adapter: lora\nbase_model: x\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")) + "lora_target_modules: *i\n"


@pytest.mark.spawns
@pytest.mark.parametrize("text, line", [
    (BILLION_LAUGHS, "too large: its aliases expand to 926,177,119 values, over the 1,000,000 allowed (an alias bomb)"),
    ("adapter: lora\nlora_target_modules: &a [q_proj, *a]\n", "an alias refers to a list or mapping that holds it"),
])
def test_yaml_alias_bombs(tmp_path, text, line):
    config = tmp_path / "axolotl.yml"
    config.write_text(text)
    assert line in one_line_error(bounded_check(config, LLAMA))


def test_list_of_lists_names_what_it_holds(tmp_path):
    config = tmp_path / "axolotl.yml"
    config.write_text("adapter: lora\nlora_target_modules: [[q_proj], v_proj]\n")
    with pytest.raises(ValueError, match="must be a list of module names, not a list holding list"):
        check(config, LLAMA)


# -- files that are not files ------------------------------------------------------------------
@pytest.mark.spawns
def test_fifo_as_model_config(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # opening it to read would block until a writer comes: plop must not open it
    for model in (fifo, tmp_path):
        error = one_line_error(bounded_check("--target-modules", "q_proj", model))
        assert f"{fifo} is not a regular file (a FIFO)" in error


# -- config.json forms that crashed or misled ------------------------------------------------
def test_transformers_non_finite_floats_read_as_transformers_writes_them(tmp_path):
    """transformers' own save_pretrained writes NemotronH's time_step_limit (0, inf) as
    {"__float__": "Infinity"}; plop reads it back as from_pretrained does, and counts what PEFT
    trains on the real model built from the same config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, NemotronHConfig

    config = NemotronHConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                             ssm_state_size=16, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                             n_routed_experts=4, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"])
    config.save_pretrained(tmp_path)
    assert '"__float__": "Infinity"' in (tmp_path / "config.json").read_text()
    result = check(inline_spec("q_proj,in_proj"), tmp_path)
    assert result.model["architecture"] == "NemotronHForCausalLM"
    assert result.exit_code == EXIT_CLEAN
    built = meta_model(tmp_path)
    assert built.config.time_step_limit == AutoConfig.from_pretrained(tmp_path).time_step_limit
    assert built.config.time_step_limit[1] == float("inf")
    real = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=16, target_modules=["q_proj", "in_proj"]))
    assert result.trainable == real.get_nb_trainable_parameters()[0]


def test_no_architectures_resolves_the_stacks_generative_class(tmp_path):
    """Without ``architectures`` a VLM builds as its ...ForConditionalGeneration, as the stacks load
    it: full-name regexes match what they match on the named class, and nothing is missed."""
    vl = FIXTURES / "Qwen2.5-VL-7B-Instruct.json"
    bare = model_config(tmp_path, vl, architectures=None)
    regex = r"model\.language_model\.layers\.\d+\.self_attn\.q_proj"
    named, unnamed = check(inline_spec(regex), vl), check(inline_spec(regex), bare)
    assert unnamed.model["architecture"] == named.model["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    assert unnamed.modules == named.modules and len(named.modules) == 28
    assert unnamed.trainable == named.trainable and unnamed.exit_code == EXIT_CLEAN


def test_no_architectures_and_no_generative_class_refused(tmp_path):
    vit = tmp_path / "config.json"
    vit.write_text(json.dumps({"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2,
                               "intermediate_size": 128, "num_attention_heads": 2}))
    with pytest.raises(ModelError, match="plop cannot know which model the stack builds"):
        check(inline_spec("query"), vit)


def test_wrongly_typed_size_is_one_line(tmp_path):
    with pytest.raises(ModelError, match="transformers cannot build a 'llama' config: .*vocab_size"):
        check(inline_spec("q_proj"), model_config(tmp_path, vocab_size=32000.5))


def test_bounded_yaml_loader_is_still_the_safe_loader():
    """The bounded loader builds only plain values, as yaml.safe_load does."""
    from plop.utils.untrusted import parse_yaml

    with pytest.raises(ValueError, match="not valid YAML"):
        parse_yaml("a: !!python/object/apply:os.system ['true']\n", "evil.yml")
    assert parse_yaml("a: &x [1, 2]\nb: *x\n", "ok.yml") == yaml.safe_load("a: &x [1, 2]\nb: *x\n")


@pytest.mark.spawns
def test_large_flat_yaml_refused_from_its_events(tmp_path):
    """4 MiB of one-character values: composing them all in Python took 45 s; the parser's events,
    counted in C, refuse the document within the hostile-case bound."""
    config = tmp_path / "axolotl.yml"
    config.write_text("adapter: lora\nlora_target_modules: [" + ",".join(["q"] * ((2 << 20) - 40)) + "]\n")
    assert "too large: it holds over 1,000,000 values" in one_line_error(bounded_check(config, LLAMA))


@pytest.mark.parametrize("text, line", [
    ("a: 1\n\tb: 2\n", "not valid YAML (found a tab character that violates indentation, line 2 column 1)"),
    ("a: \x01\n", "not valid YAML (control characters are not allowed: #x0001, at character 4)"),
    ("a: " + "9" * 5000 + "\n", "not valid YAML (Exceeds the limit (4300 digits) for integer string conversion"),
    ("a: [1, 2\n", "not valid YAML (did not find expected ',' or ']', line 2 column 1)"),
])
def test_broken_yaml_says_what_and_where(text, line):
    """Each mistake in one ConfigError line, with its place: what a user needs to fix the file."""
    from plop.utils.untrusted import parse_yaml

    with pytest.raises(ValueError) as caught:
        parse_yaml(text, "lora.yml")
    assert str(caught.value).startswith("lora.yml: " + line)
