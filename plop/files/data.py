"""Task data: load rows, turn them into (prompt, response) text.

Sources: a local JSON/JSONL/CSV/Parquet/text file or folder, a hub dataset name (when the hub is
reachable), or ``None`` for the demo data shipped with plop (``plop/resources/demo.jsonl``).
JSON-lines files (the demo data among them) are read with the standard library: importing
Hugging Face ``datasets`` (and pandas with it) takes longer than a whole small diagnosis. Every
other source goes through ``datasets``.

Each row becomes an :class:`Example` with a ``prompt`` and a ``response``; diagnosis reads
``prompt + response``, training puts the loss on the response only (``prompt`` is empty when
the text comes from a single field).
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import option
from ..errors import DataError, first_line
from ..utils.fsio import kind_of
from ..utils.untrusted import check_text_field, clip_text, plain_safe

DEMO_DATA = Path(__file__).parent.parent / "resources" / "demo.jsonl"  # plop/resources
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Field pairs recognised without any flag, in order of preference.
_PAIRS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"), ("input", "output"),
          ("prompt", "completion"), ("query", "response"))


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str

    @property
    def text(self) -> str:
        return self.prompt + self.response

    def token_ids(self, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
        """``(prompt ids, response ids)``, tokenized apart so the boundary between them is exact.
        Each text is clipped first, so a huge line costs what ``max_length`` tokens cost, not its
        own length; a response without prompt still gets the BOS a prompt would have had."""
        prompt = tokenizer(clip_text(self.prompt, max_length))["input_ids"] if self.prompt else []
        response = tokenizer(clip_text(self.response, max_length), add_special_tokens=not prompt)["input_ids"]
        return prompt, response


@dataclass
class DataSource:
    """Where the task data comes from (:func:`load_rows`)."""

    data: str | None = option(None, "JSON/JSONL/CSV/Parquet/text file or folder, or a hub dataset name (default: "
                                    "plop's built-in demo data)", group="data")
    split: str = option("train", "split of a hub dataset or folder", group="data")
    data_config: str | None = option(None, "configuration of a hub dataset", group="data", aliases=("--config",))


@dataclass
class TextFormat:
    """How rows become text. At most one of ``text_field``, ``template`` and ``chat``; with none,
    a ``text`` field or a known prompt/response pair (``prompt``/``response``,
    ``question``/``answer``, ...) is used."""

    text_field: str | None = option(None, "take the text from this one field", group="data", exclusive="text")
    template: str | None = option(None, 'format several fields, e.g. "Q: {question}\\nA: {answer}"', group="data",
                                  exclusive="text", parse="escapes")
    chat: bool = option(False, "apply the tokenizer's chat template to prompt/response", group="data",
                        exclusive="text")
    prompt_field: str | None = option(None, "field holding the prompt (default: detected)", group="data")
    response_field: str | None = option(None, "field holding the response (default: detected)", group="data")

    def __post_init__(self) -> None:
        if sum([self.text_field is not None, self.template is not None, self.chat]) > 1:
            raise DataError("choose one of --text-field, --template and --chat")

    def resolve(self, fields: list[str]) -> TextFormat:
        """Fill in the fields this format needs from the dataset's columns, or say what's missing."""
        def need(*names: str | None) -> None:
            missing = [n for n in names if n is not None and n not in fields]
            if missing:
                raise DataError(f"field {missing[0]!r} is not in the data", f"available fields: {', '.join(fields)}")

        if self.text_field is not None:
            need(self.text_field)
            return self
        if self.template is not None:
            try:
                self.template.format_map({f: "" for f in fields})
            except KeyError as e:
                raise DataError(f"template field {e.args[0]!r} is not in the data",
                                f"available fields: {', '.join(fields)}") from None
            return self
        if self.prompt_field and self.response_field:
            need(self.prompt_field, self.response_field)
            return self
        for p, r in _PAIRS:
            if p in fields and r in fields:
                return TextFormat(chat=self.chat, prompt_field=p, response_field=r)
        if not self.chat and "text" in fields:
            return TextFormat(text_field="text")
        raise DataError(
            "cannot tell which fields hold the text",
            f"available fields: {', '.join(fields)}; pass --text-field, --template or --prompt-field/--response-field",
        )

    def example(self, row: dict[str, Any], tokenizer=None, index: int = 0) -> Example:
        """Row ``index`` (named in errors) as an :class:`Example`."""
        row = {field: check_text_field(value, field, index) for field, value in row.items() if field in self._used}
        if self.text_field is not None:
            return Example("", row[self.text_field])
        if self.template is not None:
            # a template that ends in the response field splits there: the loss goes on the response
            cut = "{" + (self.response_field or "") + "}"
            if self.response_field and self.template.endswith(cut):
                return Example(self.template[: -len(cut)].format_map(row), row[self.response_field])
            return Example("", self.template.format_map(row))
        prompt, response = row[self.prompt_field], row[self.response_field]
        if not self.chat:
            return Example(prompt + "\n", response)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("--chat needs a tokenizer with a chat template", "use --template instead")
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        return Example(head, full[len(head):]) if full.startswith(head) else Example("", full)

    @functools.cached_property
    def _used(self) -> set[str]:
        """The fields the text is made of: only these must hold text."""
        fields = {self.text_field, self.prompt_field, self.response_field}
        if self.template is not None:
            fields |= {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        return fields - {None}


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a JSON-lines file and its fields (in order of first appearance); a row lacking a
    field holds None there, as with ``datasets``. Blank lines are skipped."""
    rows, fields = [], {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: malformed JSON at line {lineno}: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
            fields.update(dict.fromkeys(row))
    return [{k: row.get(k) for k in fields} for row in rows], list(fields)


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in sorted(paths):
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_rows(source: str | None = None, *, split: str = "train", config: str | None = None):
    """``(rows, info)`` for a file, folder, hub name, or the demo data (``None``): a list of dicts
    for a JSON-lines file, else a ``datasets.Dataset``."""
    path = DEMO_DATA if source is None else Path(source).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise DataError(f"{plain_safe(str(path))} is not a regular file ({kind_of(path.stat().st_mode)})")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{plain_safe(str(path))}: the file is empty")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        rows, fields = _read_jsonl(path)
        info = {"source": "demo" if source is None else str(source), "sha256": _sha256([path])}
        return rows, {**info, "rows": len(rows), "fields": fields}
    import datasets

    datasets.disable_progress_bars()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}", f"use one of {', '.join(_BUILDERS)}")
        files = [path]
        args: tuple = (builder,)
        kwargs: dict = {"data_files": str(path), "split": "train"}
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS]
        if not files:
            raise DataError(f"{path}: no data files (.json, .jsonl, .csv, .parquet, .txt) in this folder")
        args, kwargs = (str(path),), {"split": split}
    elif source is not None and (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in _BUILDERS):
        raise DataError(f"data file {source} does not exist")
    else:
        files = []
        args, kwargs = (source,), {"name": config, "split": split}
    try:
        ds = datasets.load_dataset(*args, **kwargs)
    except PermissionError as e:
        raise DataError(f"cannot read {path}: permission denied") from e
    except Exception as e:  # datasets wraps parse errors in several exception types
        if files:
            raise DataError(f"cannot read {path}: {first_line(e)}") from e
        raise DataError(f"dataset {source!r} not found locally, and the hub could not provide it: "
                        f"{first_line(e)}", "pass a local file or folder") from e
    info = {
        "source": "demo" if source is None else str(source),
        "sha256": _sha256(files) if files else getattr(ds, "_fingerprint", None),
        "rows": len(ds),
        "fields": list(ds.column_names),
    }
    if source is not None and not files:
        info.update(split=split, config=config)
    return ds, info


def sample_indices(n_rows: int, samples: int | None, seed: int) -> list[int]:
    """The one sampling rule: a seeded random subset of row indices, in the seeded order (all rows,
    shuffled, when ``samples`` is None or covers them all)."""
    order = np.random.default_rng(seed).permutation(n_rows)
    return [int(i) for i in order[: samples or n_rows]]


def take_sample(data: list, samples: int | None, seed: int) -> list:
    """``samples`` items of ``data`` by :func:`sample_indices`; data no larger than that is a sample
    already (what :func:`load_examples` returns) and is kept as given."""
    if samples is None or len(data) <= samples:
        return list(data)
    return [data[i] for i in sample_indices(len(data), samples, seed)]


@dataclass
class TaskRows:
    """Rows read and sampled, their text format resolved: everything about the data that can be
    checked before a model is loaded. :meth:`examples` formats them (a chat template needs the
    model's tokenizer)."""

    rows: list[dict[str, Any]]
    indices: list[int]
    fmt: TextFormat
    info: dict[str, Any]

    def examples(self, tokenizer=None) -> tuple[list[Example], dict[str, Any]]:
        """``(examples, info)``: rows whose text is empty are dropped (``info["dropped_empty"]``)."""
        examples, kept = [], []
        for i, row in zip(self.indices, self.rows):
            ex = self.fmt.example(row, tokenizer, i)
            if ex.text.strip():
                examples.append(ex)
                kept.append(i)
        if not examples:
            raise DataError(f"{self.info['source']}: no non-empty text left in the selected rows")
        info = {**self.info, "indices": kept, "dropped_empty": len(self.indices) - len(kept),
                "format": {k: v for k, v in asdict(self.fmt).items() if v not in (None, False)}}
        return examples, info


def read_rows(source: str | None = None, *, samples: int | None = None, seed: int = 0,
              text_format: TextFormat | None = None, split: str = "train", config: str | None = None,
              warn_short: bool = True) -> TaskRows:
    """Read ``source`` (:func:`load_rows`), sample ``samples`` rows and resolve the text format.
    ``warn_short``: say so when the data has fewer rows than asked for."""
    ds, info = load_rows(source, split=split, config=config)
    if len(ds) == 0:
        raise DataError(f"{info['source']}: the data is empty")
    fmt = (text_format or TextFormat()).resolve(info["fields"])
    if warn_short and samples is not None and samples > len(ds):
        warnings.warn(f"asked for {samples} samples but the data has {len(ds)} rows; using all of them", stacklevel=2)
    indices = sample_indices(len(ds), samples, seed)
    rows = [ds[i] for i in indices] if isinstance(ds, list) else list(ds.select(indices))  # select: one Arrow take
    return TaskRows(rows, indices, fmt, {**info, "seed": seed})


def load_examples(
    source: str | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    text_format: TextFormat | None = None,
    tokenizer=None,
    split: str = "train",
    config: str | None = None,
) -> tuple[list[Example], dict[str, Any]]:
    """Load, sample and format rows; ``info`` records the source, its hash and the row indices.

    Rows whose text is empty are dropped (and counted in ``info["dropped_empty"]``).
    """
    return read_rows(source, samples=samples, seed=seed, text_format=text_format, split=split,
                     config=config).examples(tokenizer)
