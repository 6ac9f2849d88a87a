"""Encoder-decoder models (T5, BART, mBART, Marian): what their decoder is fed during a diagnosis.

A decoder-only model sees the task's text once. An encoder-decoder has two token streams: the
encoder reads the input, the decoder the output it learns to produce (teacher forcing). So with
prompt/response pairs the encoder gets the prompt and the decoder the response, shifted right as
in training (``model.prepare_decoder_input_ids_from_labels``); a text without a prompt goes to
both, which is the denoising objective these models were pretrained on.

The collector tells the two streams' padding masks apart by their shape (batch, length): where a
decoder batch would have the encoder's width but another mask, it gets one more padding column.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..utils.untrusted import clip_text


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _shift(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for target tokens ``ids``: the start token, then the targets but the last,
    as the model's own training shifts them (mBART moves its language id to the front), else by
    ``decoder_start_token_id`` (a bare ``T5Model`` has no LM head to ask)."""
    labels = ids.masked_fill(mask == 0, -100)
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        try:
            return model.prepare_decoder_input_ids_from_labels(labels=labels)
        except (AttributeError, ValueError) as e:  # T5's shift reads a start token its config may lack
            if "decoder_start_token_id" not in str(e):
                raise
            raise ModelError(f"{type(model).__name__}'s config has no decoder_start_token_id, which its decoder "
                             "starts from", "set it in the model's config.json (T5 models use their pad token, 0)"
                             ) from None
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    start = getattr(config, "decoder_start_token_id", None)
    start = pad if start is None else start
    shifted = torch.full_like(ids, pad)
    shifted[:, 1:] = ids[:, :-1].masked_fill(mask[:, :-1] == 0, pad)
    shifted[:, 0] = start
    return shifted


def model_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward's token arguments for ``batch``: ``input_ids`` and ``attention_mask`` (all ones
    when missing), and for an encoder-decoder the decoder's, shifted from the input itself when the
    batch brings none (its mask is then the input's: one start token in, one last token out)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask}
    if is_encoder_decoder(model):
        if "decoder_input_ids" in batch:
            decoder = batch["decoder_input_ids"]
            out["decoder_input_ids"] = decoder
            out["decoder_attention_mask"] = batch.get("decoder_attention_mask", torch.ones_like(decoder))
        else:
            out["decoder_input_ids"] = _shift(model, ids, out["attention_mask"])
            out["decoder_attention_mask"] = out["attention_mask"]
    return out


def pair_batches(model: nn.Module, examples: Sequence, tokenizer, batch_size: int,
                 max_length: int) -> Iterator[dict[str, torch.Tensor]]:
    """Token batches of prompt/response ``examples`` (``.prompt``, ``.response``): the prompt
    to the encoder, the response (with EOS) to the decoder; prompt-less examples are denoised."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        # clipped before tokenizing, as every text plop reads: memory follows max_length, not the line
        sources = [clip_text(e.prompt if e.prompt else e.response, max_length) for e in chunk]
        encoder = tokenizer(sources, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                            padding_side="right")
        targets = tokenizer([clip_text(e.response, max_length) for e in chunk], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt", padding_side="right")
        ids, mask = targets["input_ids"], targets["attention_mask"]
        if ids.shape == encoder["input_ids"].shape and not torch.equal(mask, encoder["attention_mask"]):
            ids = torch.nn.functional.pad(ids, (0, 1), value=tokenizer.pad_token_id)
            mask = torch.nn.functional.pad(mask, (0, 1), value=0)
        yield {"input_ids": encoder["input_ids"], "attention_mask": encoder["attention_mask"],
               "decoder_input_ids": _shift(model, ids, mask), "decoder_attention_mask": mask}
