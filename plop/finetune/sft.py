"""Supervised fine-tuning data: a seeded eval split, tokens with response-only labels, padding.

The loss goes on the response only (``-100`` labels on the prompt and the padding), so a model
learns to answer rather than to reproduce questions; a text without a prompt is learned whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..files.data import Example

IGNORE_INDEX = -100  # the label value transformers' losses skip


def split_examples(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded ``(train, eval)`` split; eval gets at least one example when ``fraction > 0``."""
    if fraction == 0 or len(examples) < 2:
        return list(examples), []
    order = np.random.default_rng(seed).permutation(len(examples))
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` per example: prompt + response + EOS, labels ``-100`` on the prompt.

    Prompt and response are tokenized apart so the boundary is exact. An example left without a
    response token to predict (its prompt fills ``max_length``) is dropped: an all-masked batch
    has a NaN loss.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    features = []
    for ex in examples:
        prompt, response = ex.token_ids(tokenizer, max_length)
        response = response + eos
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # label 0 is never predicted
            features.append({"input_ids": ids, "labels": labels})
    return features


def tokenize_pairs(examples: Sequence[Example], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Encoder-decoder features: the prompt in and the response as labels (the model shifts them
    into its decoder inputs); an example without a prompt is denoised, its text both in and out.
    The tokenizer adds the EOS that ends a target (T5, BART and Marian tokenizers do)."""
    features = []
    for ex in examples:
        source = tokenizer(ex.prompt or ex.response, truncation=True, max_length=max_length)["input_ids"]
        labels = tokenizer(ex.response, truncation=True, max_length=max_length)["input_ids"]
        if labels:
            features.append({"input_ids": source, "labels": labels})
    return features


@dataclass
class SFTCollator:
    """Right-pads a batch: ``pad_token_id`` in the inputs, 0 in the mask, ``-100`` in the labels,
    each to its own longest row (an encoder-decoder's labels are not as long as its inputs).

    Right, whatever the tokenizer's own padding side: positions then do not depend on batch-mates."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        def pad(rows: list[list[int]], value: int) -> torch.Tensor:
            width = max(len(row) for row in rows)
            return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": pad(ids, self.pad_token_id),
            "attention_mask": pad([[1] * len(row) for row in ids], 0),
            "labels": pad([f["labels"] for f in features], IGNORE_INDEX),
        }
