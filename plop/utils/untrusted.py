"""Values that come from someone else's files: reports, configs, data rows, regexes.

A report is plain JSON anyone can hand you, so its strings may hold terminal escape sequences
(retitle the window, clear the screen, fake output), rich markup that breaks rendering, or a
``target_modules`` regex that backtracks for hours; a config may nest thousands of levels deep
(Python's parsers recurse per level) or hold a YAML alias bomb; a data row may hold a list where
text was expected, or a megabyte line. These helpers make such values safe to parse, print, match
and tokenize.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import re
import signal
import subprocess
import sys
import unicodedata

from ..errors import ConfigError, FieldTypeError, PlopError, UnsafeRegexError, first_line

try:  # Python 3.11+; sre_parse before, and deprecated since
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre
    import sre_parse as _sre_parse

# Controls beyond Cc: line/paragraph separators act as newlines in some terminals, and bidi
# overrides reorder what is displayed ("Trojan Source"), so a name could read as another.
_CONTROLS = {"Cc", "Zl", "Zp"}
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}

CHARS_PER_TOKEN = 256
"""An upper bound on the characters one token covers, to clip text before tokenizing.

Byte-level BPE tokens are pieces of the text, so a text of ``n`` characters makes at least
``n / longest`` tokens, where ``longest`` is the longest vocabulary entry decoded. The longest
entries are runs of whitespace or punctuation from code: 81 characters in SmolLM2's 49,152-entry
vocabulary (``"\\n"`` and 80 spaces; special tokens are at most 16). 256 leaves a 3x margin for
other vocabularies, and even at ``max_length`` 8192 bounds the text at 2 MiB.
"""


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in _CONTROLS or ord(char) in _BIDI


def plain_safe(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\u202e``).

    Covers C0 and C1 controls, DEL, ESC (so no ANSI sequence survives), newlines (one value stays
    one line) and bidi overrides. For ``print``; use :func:`terminal_safe` for rich.
    """
    return "".join(_escape_char(c) if _is_control(c) else c for c in str(text))


def terminal_safe(text: str) -> str:
    """:func:`plain_safe`, and rich markup escaped, for strings interpolated into rich markup:
    ``x[/]y`` prints as itself instead of raising ``MarkupError``."""
    from rich.markup import escape

    return escape(plain_safe(text))


# -- regexes ---------------------------------------------------------------------------------
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT}
_PROBE_NAMES = ("model.layers.0.self_attn.q_proj", "transformer.h.11.mlp.c_fc", "model.layers.31.mlp.down_proj")
# The child full-matches every probe, as PEFT matches module names, under a timer whose SIGALRM
# ends it (no handler is installed, so the kernel kills it even inside the C regex engine).
_PROBE_CHILD = (
    "import json, re, signal, sys\n"
    "job = json.loads(sys.stdin.read())\n"
    "regex = re.compile(job['pattern'])\n"
    "signal.setitimer(signal.ITIMER_REAL, job['budget'])\n"
    "for probe in job['probes']:\n"
    "    regex.fullmatch(probe)\n"
)
_STARTUP_TIMEOUT = 10.0  # a hang guard for a loaded machine, not the budget


def _subpatterns(value):
    """The parsed subpatterns inside one node's arguments, however deeply tupled."""
    if isinstance(value, _sre_parse.SubPattern):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subpatterns(item)


def _nested_repeat(pattern: _sre_parse.SubPattern) -> bool:
    """Whether a repeat that may run more than once contains something of unbounded width:
    ``(a+)+``, ``(a*)*``, ``(.*a){20}`` -- the shape that backtracks exponentially."""
    for op, av in pattern:
        if op in _REPEATS and av[1] > 1 and av[2].getwidth()[1] >= _sre.MAXREPEAT:
            return True
        if any(_nested_repeat(sub) for sub in _subpatterns(av)):
            return True
    return False


def _literals(pattern: _sre_parse.SubPattern) -> list[str]:
    """The distinct characters the pattern matches literally, anywhere in its tree."""
    found = [chr(av) for op, av in pattern if op == _sre.LITERAL]
    for _, av in pattern:
        for sub in _subpatterns(av):
            found += _literals(sub)
    return list(dict.fromkeys(found))


def _probes(pattern: _sre_parse.SubPattern) -> list[str]:
    """Near-misses that fail only at their end, which make a backtracking regex try every way of
    splitting them: runs of one character (48 of them: 2^48 ways for ``(a|a)+``), and module
    names, repeated."""
    probes = [char * 48 + "!" for char in ["a", "0", *_literals(pattern)[:8]]]
    for name in _PROBE_NAMES:
        probes += [name, ".".join([name] * 8) + "!", name.replace(".", "") * 4 + "!"]
    return probes


def _run_probes(pattern: str, probes: list[str], time_budget: float) -> bool:
    """Whether matching every probe finishes within ``time_budget`` seconds, timed in a child
    process (the ``re`` engine cannot be stopped from another thread, and holds the GIL)."""
    job = json.dumps({"pattern": pattern, "probes": probes, "budget": time_budget}).encode()
    try:
        child = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE_CHILD], input=job,
                               capture_output=True, timeout=_STARTUP_TIMEOUT + time_budget)
    except subprocess.TimeoutExpired:
        return False
    if child.returncode not in (0, -signal.SIGALRM):
        raise RuntimeError(f"the regex probe failed: {child.stderr.decode(errors='replace')}")
    return child.returncode == 0


def check_regex(pattern: str, *, max_length: int = 2000, time_budget: float = 0.2) -> re.Pattern:
    """The compiled ``pattern``, if it is safe to match against module names; else
    :class:`UnsafeRegexError` with a one-line reason.

    Refused: non-strings, patterns over ``max_length`` characters, invalid ones, nested unbounded
    repeats (found in the parsed tree), and any that takes over ``time_budget`` seconds on
    adversarial probes (timed in a child process, so even a pattern the tree check misses, like
    ``(a|aa)+``, cannot hang plop). Verdicts on strings are cached: each costs a process.
    """
    if not isinstance(pattern, str):
        raise UnsafeRegexError(f"a regex must be a string, not {type(pattern).__name__}")
    return _check_string_regex(pattern, max_length, time_budget)


@functools.lru_cache(maxsize=64)
def _check_string_regex(pattern: str, max_length: int, time_budget: float) -> re.Pattern:
    shown = "'" + plain_safe(pattern if len(pattern) <= 80 else pattern[:77] + "...") + "'"
    if len(pattern) > max_length:
        raise UnsafeRegexError(f"regex {shown} is {len(pattern):,} characters, over the {max_length:,} allowed")
    try:
        regex = re.compile(pattern)
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise UnsafeRegexError(f"{shown} is not a valid regex: {e}") from None
    try:
        nested, probes = _nested_repeat(parsed), _probes(parsed)
    except RecursionError:
        raise UnsafeRegexError(f"regex {shown} nests groups too deeply") from None
    if nested:
        raise UnsafeRegexError(f"regex {shown} nests unbounded repeats (like (a+)+), which can take hours to match")
    if not _run_probes(pattern, probes, time_budget):
        raise UnsafeRegexError(f"regex {shown} takes over {time_budget:g} s on a test string: it backtracks")
    return regex


# -- nested documents ------------------------------------------------------------------------
MAX_NESTING = 100
"""The deepest lists and mappings a config may nest. Real ones nest a few levels (a VLM's
``text_config.rope_scaling``: 3); Python's JSON decoder recurses once per level and dies with
``RecursionError`` near 1,000, and libyaml stops at 1,000, so the limit sits far from both."""

MAX_YAML_VALUES = 1_000_000
"""The most values a YAML document may hold, its aliases expanded. A training config holds hundreds;
a 4 MiB file holds at most about 2 million without aliases, but nine nested aliases of nine
(a "billion laughs") stand for 387 million, which every walk over the value would visit."""

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # its brackets are text, not nesting
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = str.maketrans({"[": "\x02", "{": "\x02", "]": "\x00", "}": "\x00"})


def json_depth(text: str) -> int:
    """How deeply the lists and objects of ``text`` nest, counted without parsing (nor recursing)."""
    steps = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).translate(_STEP).encode()
    # an opening bracket is a 2, a closing one a 0: after n brackets the depth is their sum minus n,
    # computed in C, as a 4 MiB file of brackets would take a second in a Python loop
    return max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)), default=0)


def check_json_depth(text: str, source: str, error: type[PlopError] = ConfigError) -> None:
    """``error`` in one line when JSON ``text`` from ``source`` nests over :data:`MAX_NESTING` levels."""
    depth = json_depth(text)
    if depth > MAX_NESTING:
        raise error(f"{source}: nests lists and objects {depth:,} levels deep, over the {MAX_NESTING} allowed")


def parse_json(text: str, source: str, error: type[PlopError] = ConfigError, object_hook=None):
    """The value of JSON ``text`` from ``source``, or ``error`` in one line: invalid, nested over
    :data:`MAX_NESTING` levels, or an integer over Python's 4,300 digits."""
    check_json_depth(text, source, error)
    try:
        return json.loads(text, object_hook=object_hook)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except ValueError as e:
        raise error(f"{source}: not valid JSON ({first_line(e)})") from None


class _Refused(Exception):
    """A YAML document refused while it is read: the reason, for :func:`parse_yaml` to place."""


def _yaml_loader() -> type:
    """libyaml's safe loader where PyYAML was built with it (its wheels are): it parses and composes
    in C, about 30x faster than the pure-Python loader, which took 45 s on 4 MiB of ``[1,1,...]``."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str) -> None:
    """Refuse, from the parser's event stream alone, a document nested over :data:`MAX_NESTING`
    levels or holding over :data:`MAX_YAML_VALUES` nodes, stopping at the first event past either:
    composing it would first build every node, and recurse once per level."""
    import yaml

    depth = nodes = 0
    for event in yaml.parse(text, Loader=_yaml_loader()):
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_YAML_VALUES:
                raise _Refused(f"too large: it holds over {MAX_YAML_VALUES:,} values")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise _Refused(f"nests lists and mappings over {MAX_NESTING} levels deep "
                               f"(line {event.start_mark.line + 1})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _expanded_size(node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The values under ``node`` (itself included) with every alias expanded; each distinct node is
    counted once into ``sizes``, so this takes time in the nodes, not in what they expand to."""
    key = id(node)
    if key in open_nodes:
        raise _Refused("an alias refers to a list or mapping that holds it, so it never ends")
    if key not in sizes:
        open_nodes.add(key)
        items = node.value if isinstance(node.value, list) else []  # a scalar's value is its text
        children = [child for item in items for child in (item if isinstance(item, tuple) else (item,))]
        sizes[key] = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
        open_nodes.discard(key)
    return sizes[key]


def parse_yaml(text: str, source: str):
    """The value of YAML ``text`` from ``source`` (safe loader), or a one-line :class:`ConfigError`:
    invalid, nested over :data:`MAX_NESTING` levels, or over :data:`MAX_YAML_VALUES` values."""
    import yaml

    loader = None
    try:
        _check_events(text)
        loader = _yaml_loader()(text)
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}
        size = _expanded_size(node, sizes, set())  # recursion bounded: the events were no deeper
        if size > MAX_YAML_VALUES:
            raise _Refused(f"too large: its aliases expand to {size:,} values, over the {MAX_YAML_VALUES:,} "
                           f"allowed (an alias bomb)")
        return loader.construct_document(node)
    except _Refused as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.reader.ReaderError as e:  # a character YAML forbids, found before any token
        char = e.character if isinstance(e.character, str) else f"#x{e.character:04x}"  # libyaml: a code point
        raise ConfigError(f"{source}: not valid YAML ({e.reason}: {char}, at character {e.position + 1})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        if "nesting depth" in problem:  # libyaml's own limit (1,000 levels), met while it reads ahead
            raise ConfigError(f"{source}: nests lists and mappings over {MAX_NESTING} levels deep "
                              f"(line {mark.line + 1})") from None
        raise ConfigError(f"{source}: not valid YAML ({problem}{where})") from None
    except ValueError as e:  # an integer over Python's 4,300 digits, as in parse_json
        raise ConfigError(f"{source}: not valid YAML ({first_line(e)})") from None
    finally:
        if loader is not None:
            loader.dispose()


# -- text ------------------------------------------------------------------------------------
def clip_text(text: str, max_tokens: int) -> str:
    """``text`` cut to the characters ``max_tokens`` tokens can cover (:data:`CHARS_PER_TOKEN`
    each), so a megabyte row costs no more to tokenize than a full-length one; truncating the
    result to ``max_tokens`` tokens gives what truncating ``text`` would."""
    return text[: max_tokens * CHARS_PER_TOKEN]


def check_text_field(value: object, field: str, row: int) -> str:
    """The text in a data field: a string as is, a number as written (``42``), ``None`` (a missing
    value) as ``""``; a list, a dict or anything else is a :class:`FieldTypeError` naming the
    field, the row and the type found, instead of being diagnosed as its Python repr."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise FieldTypeError(f"row {row}: field {plain_safe(field)!r} holds {type(value).__name__}, not text",
                         "choose a text field with --text-field or --template")
