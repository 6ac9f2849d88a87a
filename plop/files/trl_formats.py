"""TRL's standard dataset formats as plop :class:`~plop.files.data.Example`\\ s.

TRL (https://huggingface.co/docs/trl/dataset_formats) trains on rows of these shapes, each either
*standard* (strings) or *conversational* (lists of ``{"role", "content"}`` messages):

* language modeling: ``text`` (standard) or ``messages`` (conversational);
* prompt-completion: ``prompt`` / ``completion`` (an extra ``label``, TRL's unpaired preference,
  is ignored);
* preference: ``chosen`` / ``rejected``, with ``prompt`` or with the prompt implicit in both.

Each row becomes one ``Example(prompt, response)``, which plop tokenizes apart and batches as it
does its own data (:func:`plop.measure.batching.example_batches`), so ``tokens="response"`` scores what
``SFTTrainer`` trains on by default (the completion) and ``tokens="prompt"`` the rest. A
preference row is scored on its prompt and its chosen answer: what a policy is tuned towards.
Conversations are rendered by the tokenizer's chat template exactly as TRL renders them
(``trl.data_utils.apply_chat_template``): the prompt with the generation prompt, the response as
the rest of the full rendering; a ``messages`` row splits before its last assistant message.

Torch-free: ``datasets`` is only looked at, never imported, so a list of dicts costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, DataError, first_line
from ..utils.untrusted import check_text_field, plain_safe
from .data import Example, sample_indices

# One line per format, for the error on data in none of them.
FORMATS = ("language modeling (text, or messages)", "prompt-completion (prompt, completion)",
           "preference (chosen, rejected, optionally prompt)")
# An IterableDataset may be endless: without a sample size plop reads this many rows of it.
STREAM_ROWS = 1024


def is_dataset(data: object) -> bool:
    """A ``datasets.Dataset``/``IterableDataset`` or a non-empty list of dicts: what TRL trains on.
    A list of dicts holding ``input_ids`` is plop's token batches instead."""
    if type(data).__name__ in ("Dataset", "IterableDataset") and hasattr(data, "column_names"):
        return True
    return isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and bool(data) and \
        isinstance(data[0], Mapping) and "input_ids" not in data[0]


def detect_format(fields: Iterable[str]) -> str:
    """``"text"``, ``"messages"``, ``"prompt_completion"`` or ``"preference"``, from the columns."""
    fields = set(fields)
    if {"chosen", "rejected"} <= fields:
        return "preference"
    if {"prompt", "completion"} <= fields:
        return "prompt_completion"
    if "messages" in fields:
        return "messages"
    if "text" in fields:
        return "text"
    raise DataError(f"the dataset is in none of TRL's formats plop reads: its fields are "
                    f"{', '.join(sorted(map(plain_safe, fields))) or 'none'}",
                    f"plop reads {'; '.join(FORMATS)}")


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], Mapping) and "role" in value[0]


def _render(tokenizer, messages: list, **kwargs) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational rows need a tokenizer with a chat template",
                        "pass the tokenizer TRL trains with, or give the rows as strings")
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def chat_example(tokenizer, prompt: list, response: list) -> Example:
    """The conversation ``prompt + response`` split where ``response`` starts, as TRL splits it:
    the prompt rendered with the generation prompt (or continuing its own last assistant message),
    the response the rest of the whole rendering."""
    if not prompt:
        return Example("", _render(tokenizer, response))
    ends_assistant = prompt[-1].get("role") == "assistant"
    head = _render(tokenizer, prompt, add_generation_prompt=not ends_assistant,
                   continue_final_message=ends_assistant)
    full = _render(tokenizer, prompt + response)
    # a template may render the prompt differently once an answer follows: keep their common part
    cut = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
    return Example(full[:cut], full[cut:])


def _implicit_prompt(chosen, rejected):
    """TRL's ``extract_prompt``: the longest common prefix of chosen and rejected (turns of a
    conversation, characters of a string, a space before the answers going with the answers)."""
    idx = 0
    while idx < min(len(chosen), len(rejected)) and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and idx < min(len(chosen), len(rejected)) and idx and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:]


def _pair(row: Mapping[str, Any], fmt: str) -> tuple[Any, Any]:
    """``(prompt, response)`` of a row as TRL reads it, each a string or a message list."""
    if fmt == "text":
        return "", row["text"]
    if fmt == "messages":
        messages = list(row["messages"] or [])
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        return (messages[:last], messages[last:]) if last is not None else ([], messages)
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    if row.get("prompt") is not None:
        return row["prompt"], row["chosen"]
    return _implicit_prompt(row["chosen"], row["rejected"])


def row_example(row: Mapping[str, Any], fmt: str, tokenizer=None, index: int = 0) -> Example:
    """Row ``index`` (named in errors) of a dataset in format ``fmt`` as an :class:`Example`."""
    prompt, response = _pair(row, fmt)
    if _is_messages(prompt) or _is_messages(response) or fmt == "messages":
        return chat_example(tokenizer, list(prompt or []), list(response or []))
    fields = {"text": ("text", "text"), "prompt_completion": ("prompt", "completion")}.get(fmt, ("prompt", "chosen"))
    return Example(check_text_field(prompt, fields[0], index), check_text_field(response, fields[1], index))


def _rows(data, samples: int | None, seed: int) -> tuple[list[int], list[Mapping[str, Any]]]:
    """The sampled rows and their indices: a seeded random subset of a list or ``Dataset`` (as
    :func:`plop.files.data.load_examples` samples files), the first rows of an ``IterableDataset``."""
    if type(data).__name__ == "IterableDataset":
        rows = []
        for row in data:
            if len(rows) == (samples or STREAM_ROWS):
                break
            rows.append(row)
        return list(range(len(rows))), rows
    indices = sample_indices(len(data), samples, seed)
    rows = [data[i] for i in indices] if isinstance(data, Sequence) else data.select(indices)
    return indices, list(rows)


def _fields(data) -> list[str]:
    """The columns; a stream whose features are not declared shows them in its first row."""
    if getattr(data, "column_names", None):
        return list(data.column_names)
    first = next(iter(data), None) if type(data).__name__ == "IterableDataset" else data[0]
    if not isinstance(first, Mapping):
        raise DataError("the dataset is empty" if first is None else "the dataset's rows are not dicts")
    return list(first)


def model_tokenizer(model):
    """The tokenizer saved with ``model`` (its ``name_or_path``), as ``SFTTrainer`` finds one when
    given none; a model built in memory has no such path and needs ``tokenizer=``."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not name:
        raise ConfigError("this model has no name_or_path to load its tokenizer from", "pass tokenizer=")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of {plain_safe(str(name))}: {first_line(e)}",
                          "pass tokenizer=") from None


def dataset_examples(data, tokenizer=None, *, samples: int | None = None, seed: int = 0,
                     tokens: str = "all") -> tuple[list[Example], dict[str, Any]]:
    """``(examples, info)`` of a TRL-format dataset; ``info`` (recorded in the report) names its
    type, fields, format and the rows used. Rows whose text is empty are dropped; ``tokens`` is
    the scope to be scored, refused when no row has any of it."""
    fields = _fields(data)
    fmt = detect_format(fields)
    indices, rows = _rows(data, samples, seed)
    examples, kept = [], []
    for i, row in zip(indices, rows):
        example = row_example(row, fmt, tokenizer, i)
        if example.text.strip():
            examples.append(example)
            kept.append(i)
    if not examples:
        raise DataError("the dataset has no non-empty text in the rows sampled")
    if tokens == "prompt" and not any(e.prompt for e in examples):
        raise DataError(f"tokens='prompt' scores nothing: rows in the {fmt!r} format have no prompt",
                        "score tokens='all' or 'response'")
    source = type(data).__name__ if not isinstance(data, list) else "list of dicts"
    info = {"source": source, "rows": len(data) if hasattr(data, "__len__") else None, "fields": fields,
            "indices": kept, "dropped_empty": len(rows) - len(kept), "seed": seed, "format": {"trl": fmt}}
    return examples, info
