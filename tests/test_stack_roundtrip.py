"""Every stack, both ways: what ``plop.stacks`` writes for a placement, the same stack's reader
reads back to that placement and those settings, wherever the stack has keys for them, over
generated placements (type suffixes, per-layer regexes and excluded layers, rank patterns, 3-D
expert weights) and settings. An export that claims to be exact reaches exactly the placement's
modules by PEFT's matcher; one that is not says so in its read-back line."""

from __future__ import annotations

import copy
import json

import archs
import pytest
from conftest import make_batches, make_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plop import diagnose
from plop.audit.verify import export_difference, resolve_export
from plop.placement import LoraSettings
from plop.ranking.ranker import modules_regex
from plop.stacks import READABLE, STACKS, export
from plop.stacks.reading import parse_yaml

# the stacks whose files carry target_parameters, and so a dropout of 0 with them (PEFT refuses any other)
WRITE_PARAMETERS = {"peft", "axolotl", "trl", "unsloth"}
WRITE_PATTERNS = {"peft", "axolotl", "unsloth"}
WRITE_RSLORA = {"peft", "axolotl", "llama-factory", "trl", "unsloth"}  # mlx-lm and torchtune have no key


@pytest.fixture(scope="module")
def reports():
    moe = archs.build("gpt_oss")
    return {"llama": diagnose(make_llama(), make_batches(8, 8), n_bootstrap=5),
            "gpt_oss": diagnose(moe, make_batches(8, 8, vocab=moe.config.vocab_size), n_bootstrap=5)}


@st.composite
def placements(draw, report):
    """A copy of ``report`` recommending a generated placement."""
    out = copy.deepcopy(report)
    rec = out.recommendation
    experts = {m.name for m in out.modules if m.experts}
    expert_types = {m.type for m in out.modules if m.experts}
    if draw(st.booleans()):  # whole types, as the top-k and budget strategies choose
        types = draw(st.lists(st.sampled_from(out.module_types), min_size=1, max_size=4, unique=True))
        rec.modules = [m.name for m in out.modules if m.type in types]
        rec.target_modules = [t for t in types if t not in expert_types]
        rec.target_parameters = [t for t in types if t in expert_types] or None
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(types), min_size=1, unique=True))
            rec.rank_pattern = {t: draw(st.sampled_from([2, 4, 8, 32])) for t in chosen}
    else:  # single modules, some layers left out, as the per_layer strategy chooses
        names = [m.name for m in out.modules]
        layers = sorted({m.layer for m in out.modules if m.layer is not None})
        kept = draw(st.lists(st.sampled_from(layers), min_size=1, unique=True))
        pool = [m.name for m in out.modules if m.layer in kept]
        rec.modules = sorted(draw(st.lists(st.sampled_from(pool), min_size=1, unique=True)), key=names.index)
        plain = [n for n in rec.modules if n not in experts]
        rec.target_modules = modules_regex(plain) if plain else []
        rec.target_parameters = [n for n in rec.modules if n in experts] or None
        rec.strategy = "per_layer"
    rec.types = sorted({m.type for m in out.modules if m.name in rec.modules})
    return out


@st.composite
def lora_settings(draw, experts: bool):
    return LoraSettings(draw(st.sampled_from([2, 4, 8, 16])), draw(st.sampled_from([None, 4.0, 8.0, 32.0])),
                        draw(st.sampled_from([0.0, 0.05, 0.1])), use_dora=not experts and draw(st.booleans()),
                        use_rslora=draw(st.booleans()), loraplus_ratio=draw(st.sampled_from([None, 1.0, 16.0])))


def _parse(text: str, fmt: str):
    return json.loads(text) if fmt == "peft" else text if fmt == "unsloth" else parse_yaml(text, fmt)


def _round_trip(report, lora: LoraSettings, fmt: str) -> None:
    rec = report.recommendation
    result = export(report, fmt, lora)
    config = STACKS[fmt].read(_parse(result.text, fmt), f"the {fmt} export")
    reached = resolve_export(result.text, fmt, report)
    difference = export_difference(result.text, fmt, report)
    assert (difference is None) == (reached == set(rec.modules)), difference
    if result.exact:
        assert reached == set(rec.modules), (rec.target_modules, result.text)
    assert config.stack == fmt
    assert config.settings.r == lora.r and config.settings.lora_alpha == pytest.approx(lora.lora_alpha)
    zeroed = rec.target_parameters and fmt in WRITE_PARAMETERS
    assert config.settings.dropout == (0.0 if zeroed else lora.dropout)
    assert config.settings.use_dora == lora.use_dora
    if fmt in WRITE_RSLORA:
        assert config.settings.use_rslora == lora.use_rslora
    else:
        assert any("no rsLoRA key" in w for w in result.warnings) == lora.use_rslora
    if fmt in WRITE_PARAMETERS:
        assert config.placement.target_parameters == rec.target_parameters
    if fmt in WRITE_PATTERNS and rec.rank_pattern:
        assert config.placement.rank_pattern == rec.rank_pattern
        assert config.placement.alpha_pattern == pytest.approx(
            {t: r * lora.lora_alpha / lora.r for t, r in rec.rank_pattern.items()})


@pytest.mark.parametrize("fmt", READABLE)
@pytest.mark.parametrize("model", ["llama", "gpt_oss"])
def test_write_then_read_gives_back_the_placement_and_settings(reports, model, fmt):
    report = reports[model]
    experts = any(m.experts for m in report.modules)

    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(placements(report), st.data())
    def check(rep, data):
        _round_trip(rep, data.draw(lora_settings(experts and bool(rep.recommendation.target_parameters))), fmt)

    check()


def test_every_stack_is_listed_once_and_detected_by_its_own_keys(reports):
    """The registry is the one list: each readable stack's export is detected as that stack."""
    from plop.stacks import FORMATS, detect

    assert FORMATS == tuple(STACKS) and set(READABLE) == set(FORMATS) - {"spectrum"}
    for fmt in READABLE:
        assert detect(_parse(export(reports["llama"], fmt).text, fmt), fmt) == fmt


def test_the_axolotl_plugin_sets_only_the_placement_keys(reports):
    """The plugin writes where the adapters go through the axolotl stack, and leaves the run's own
    rank, alpha and dropout alone (but for the 0 dropout PEFT needs on expert weights)."""
    from plop.stacks.axolotl import placement_keys
    from plop.stacks.target import Target

    llama, moe = reports["llama"], reports["gpt_oss"]
    assert placement_keys(Target(llama, LoraSettings(8, 16))) == {
        "lora_target_modules": llama.recommendation.target_modules, "lora_target_linear": False}
    allocated = copy.deepcopy(llama)
    allocated.recommendation.rank_pattern = {t: 4 for t in allocated.recommendation.types}
    keys = placement_keys(Target(allocated, LoraSettings(8, 8, 0.1)))
    assert keys["lora_rank_pattern"] == {t: 4 for t in llama.recommendation.types}
    assert keys["lora_alpha_pattern"] == {t: 4 for t in llama.recommendation.types}  # alpha / rank 1, as the run's
    experts = placement_keys(Target(moe, LoraSettings(8, 16, 0.1)))
    assert experts["lora_target_parameters"] == moe.recommendation.target_parameters
    assert experts["lora_dropout"] == 0.0 and "lora_r" not in experts
