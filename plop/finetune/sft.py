"""Supervised fine-tuning: a seeded eval split, tokens with response-only labels, padding, and
:class:`SFT`, the method's parts of a run (:class:`plop.finetune.method.Method`).

The loss goes on the response only (``-100`` labels on the prompt and the padding), so a model
learns to answer rather than to reproduce questions; a text without a prompt is learned whole.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import PlopError
from ..files.data import Example
from ..model.loading import ensure_pad_token
from .config import TrainConfig

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


class SFT:
    """Supervised fine-tuning's parts of a run; GRPO's are :class:`plop.finetune.grpo.GRPO`."""

    @staticmethod
    def datasets(examples: Sequence[Example], tokenizer, config: TrainConfig,
                 eval_examples: Sequence[Example] | None = None, seq2seq: bool = False) -> tuple[list, list]:
        """Tokenized train and eval sets (response-only labels, or an encoder-decoder's targets),
        saying how many examples had nothing left to learn."""
        ensure_pad_token(tokenizer)
        parts = (examples, eval_examples) if eval_examples is not None else \
            split_examples(examples, config.eval_fraction, config.seed)
        tokenize = tokenize_pairs if seq2seq else tokenize_examples
        train_set, eval_set = (tokenize(part, tokenizer, config.max_length) for part in parts)
        if not train_set:
            raise PlopError("no example has a response token left to learn from",
                            "raise --max-length, or check the prompt/response fields")
        dropped = len(examples) + len(eval_examples or ()) - len(train_set) - len(eval_set)
        if dropped:
            warnings.warn(f"{dropped} example(s) have no response token within max_length={config.max_length} "
                          "and are left out", stacklevel=3)
        return train_set, eval_set

    @staticmethod
    def arguments(config: TrainConfig, model) -> dict[str, Any]:
        return {}

    @staticmethod
    def trainer(peft_model, tokenizer, args, datasets: tuple[list, list], callbacks: list, config: TrainConfig):
        from .hf_trainer import LoraPlusTrainer

        return LoraPlusTrainer(model=peft_model, args=args, train_dataset=datasets[0], eval_dataset=datasets[1] or None,
                               data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                               callbacks=callbacks, loraplus_ratio=config.lora.loraplus_ratio or 1.0)

    @staticmethod
    def evaluate(trainer, eval_set: list, config: TrainConfig) -> dict[str, Any]:
        """The Trainer's eval loss (over every held-out response token) and its perplexity, and each
        held-out row's own mean token loss (``items``), which paired statistics resample."""
        loss = float(trainer.evaluate()["eval_loss"])
        return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf,
                "items": _item_losses(trainer.model, eval_set, SFTCollator(trainer.processing_class.pad_token_id),
                                      config.batch_size)}

    @staticmethod
    def step_size(trainer, eval_set: list, config: TrainConfig) -> dict[str, float]:
        """The adapters' share of the adapted modules' outputs on the held-out rows."""
        from .step_size import relative_output_change

        collate = SFTCollator(trainer.processing_class.pad_token_id)
        batches = (collate(eval_set[i:i + config.batch_size]) for i in range(0, len(eval_set), config.batch_size))
        return {"relative_output_change": relative_output_change(trainer.model, batches)}

    @staticmethod
    def summary(trainer) -> dict[str, Any]:
        return {}


@torch.no_grad()
def _item_losses(model, rows: list, collate, batch_size: int) -> list[float]:
    """Each row's mean loss over its labelled tokens, in eval mode."""
    training, losses = model.training, []
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
        labels = batch["labels"]
        if getattr(model.config, "is_encoder_decoder", False):  # the decoder reads the labels shifted right
            logits = model(**batch).logits
        else:  # a causal LM predicts the next token
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = labels[:, 1:]
        token = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none",
                                                  ignore_index=IGNORE_INDEX)
        counted = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
        losses += (token.sum(1) / counted).tolist()
    model.train(training)
    return losses
