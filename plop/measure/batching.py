"""Token batches with no compute on padding: rows sorted by length inside windows of the sampled
order, packed under a budget of tokens per batch.

A right-padded batch costs ``rows x longest row`` tokens of compute, whatever its real tokens.
Rows of like length batched together waste little: :func:`pack` cuts the sorted rows where that
computes the fewest tokens, under a budget of ``batch_tokens`` per batch (``rows x longest <=
batch_tokens``, a bound on memory), so short rows batch wide and long rows narrow.

What stays exactly as in sampled order:

* the rows: the same sampled set, each tokenized once and right padded, so a row's positions,
  and its features under the attention mask, do not depend on its batch-mates;
* the bootstrap: a row's Poisson weights follow its place in the sampled order
  (:attr:`Batch.rows`, see :class:`plop.measure.collector.BootstrapWeights`), not its batch;
* the checkpoints: rows are sorted only inside windows of the sampled order of 16, 16, 32, 64, ...
  rows (each as long as all before it, up to 1024), and a diagnosis records its selection (and
  ``until_stable`` may stop) only where a window closes, when the rows seen are exactly the
  first rows of the sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import STABLE_MIN_ROWS
from ..errors import DataError

MAX_WINDOW = 1024
_BATCH_COST_SHARE = 16  # a forward costs budget / 16 tokens of its own (see pack)
# A GPU's default budget: what a quarter of its free memory holds, at this many activations of
# the model's widest layer per token (residual stream, attention, the MLP's intermediate ones).
_ACTIVATIONS_PER_TOKEN = 8
_FREE_MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class Batch:
    """One forward's inputs and the places of its rows in the sampled order."""

    inputs: Mapping[str, torch.Tensor]
    rows: np.ndarray
    closes_window: bool = True  # the rows seen after it are the first rows of the sample
    scored: torch.Tensor | None = None  # (batch, seq) tokens to score, when not all real ones are

    def __len__(self) -> int:
        return len(self.rows)


def windows(n: int, first: int = STABLE_MIN_ROWS, largest: int = MAX_WINDOW) -> Iterator[range]:
    """``range(0, n)`` cut into windows of ``first``, ``first``, then each as long as all before it,
    up to ``largest`` rows (which bounds what is tokenized ahead and the packing's work)."""
    start, size = 0, first
    while start < n:
        yield range(start, min(n, start + size))
        start += size
        size = min(start, largest)


def pack(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches that compute the fewest tokens.

    The rows are sorted longest first (so a batch too large for memory fails at once, not at
    the end) and cut into runs minimising ``sum(rows x longest) + batches x budget / 16``: the
    padded tokens, plus what each forward costs of its own, in tokens (launches, hooks), which
    keeps batches from getting needlessly narrow. A batch holds ``rows x longest <= budget``
    tokens; a row longer than the budget goes alone. Exact, by dynamic programming over the
    sorted rows: ``O(rows x rows per batch)``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    width = [lengths[i] for i in order]
    per_batch = budget / _BATCH_COST_SHARE
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):  # the last batch is order[start:end], width[start] wide
            rows = end - start
            if rows > 1 and rows * width[start] > budget:
                break  # wider and longer from here on
            cost = best[start] + rows * width[start] + per_batch
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[cut[end]:end])
        end = cut[end]
    return batches[::-1]


def pad_right(encodings: Mapping[str, Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each field's rows to the longest (``pad_id`` for ``input_ids``, 0 elsewhere)."""
    width = max(1, *(len(ids) for ids in encodings["input_ids"]))  # rows of empty texts: one padding token
    out = {}
    for key, rows in encodings.items():
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long)
    return out


def text_batches(texts: Sequence[str], tokenizer, *, max_length: int, batch_tokens: int) -> Iterator[Batch]:
    """The batches of ``texts``, tokenized a window at a time (``until_stable`` tokenizes only
    the windows it reaches)."""
    def encode(window: range):
        encodings = tokenizer([texts[i] for i in window], truncation=True, max_length=max_length)
        return {key: encodings[key] for key in encodings.keys()}, None

    return _batches(len(texts), encode, tokenizer.pad_token_id, batch_tokens)


def example_batches(examples: Sequence, tokenizer, *, max_length: int, batch_tokens: int,
                    tokens: str) -> Iterator[Batch]:
    """The batches of prompt/response ``examples`` read whole, scoring only the ``tokens``
    (``"prompt"`` or ``"response"``) of each. Prompt and response are tokenized apart, as
    training tokenizes them, so the boundary is exact (a text without prompt keeps its BOS)."""
    def encode(window: range):
        ids, spans = [], []
        for i in window:
            prompt, response = examples[i].token_ids(tokenizer, max_length)
            row = (prompt + response)[:max_length]
            boundary = min(len(prompt), len(row))
            ids.append(row)
            spans.append((0, boundary) if tokens == "prompt" else (boundary, len(row)))
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}, spans

    return _batches(len(examples), encode, tokenizer.pad_token_id, batch_tokens)


def _batches(n: int, encode, pad_id: int, batch_tokens: int) -> Iterator[Batch]:
    """Rows ``0..n-1`` by window: ``encode(window)`` gives their token fields and, optionally, the
    ``(start, stop)`` span of each row's tokens to score; each window is packed and padded."""
    for window in windows(n):
        fields, spans = encode(window)
        groups = pack([len(ids) for ids in fields["input_ids"]], batch_tokens)
        for k, group in enumerate(groups):
            inputs = pad_right({key: [rows[i] for i in group] for key, rows in fields.items()}, pad_id)
            scored = None
            if spans is not None:
                positions = torch.arange(inputs["input_ids"].shape[1])
                bounds = torch.tensor([spans[i] for i in group]).reshape(-1, 2, 1)
                scored = ((positions >= bounds[:, 0]) & (positions < bounds[:, 1])).long()
            yield Batch(inputs, np.array([window.start + i for i in group]), k == len(groups) - 1, scored)


def token_batches(batches, samples: int | None) -> Iterator[Batch]:
    """The caller's own token batches as they come, cut to ``samples`` rows; each closes a window."""
    seen = 0
    for inputs in batches:
        if "input_ids" not in inputs:
            raise DataError("each batch must hold 'input_ids' (and ideally 'attention_mask')")
        n = len(inputs["input_ids"])
        if samples is not None:
            if seen >= samples:
                return
            if n > samples - seen:
                inputs, n = {k: v[: samples - seen] for k, v in inputs.items()}, samples - seen
        yield Batch(inputs, np.arange(seen, seen + n))
        seen += n


def default_batch_tokens(batch_size: int, max_length: int, *, free_bytes: int | None = None,
                         width: int = 0, element_bytes: int = 4) -> int:
    """The budget when none is given: ``batch_size`` rows of ``max_length`` (today's peak of a
    padded batch), or on a GPU with ``free_bytes`` free, what a quarter of that holds at a few
    activations of ``width`` (the model's widest layer) per token, if that is more."""
    floor = batch_size * max_length
    if free_bytes is None or width <= 0:
        return floor
    return max(floor, int(free_bytes * _FREE_MEMORY_SHARE) // (_ACTIVATIONS_PER_TOKEN * width * element_bytes))
