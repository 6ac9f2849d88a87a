"""The model's own completions: seeded samples to diagnose on (``--generate K``) and greedy answers
to score a policy by (``plop train --method grpo``'s held-out reward).

RL trains on what the model itself writes, not on reference responses, so a diagnosis meant for an
RL fine-tune should read those tokens. Sampling follows the model's ``generation_config``
(temperature, top-p, top-k as its authors shipped them); the GRPO trainer samples with the same
settings, so the diagnosed tokens are drawn from the distribution training starts from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..files.data import Example
from ..utils.untrusted import clip_text

# sequences per generate() call (prompts x K samples): bounds memory whatever K is; 32 greedy
# prompts per call decode 1.6x faster than 8 on 2 CPU cores (SmolLM2-135M, 16 new tokens)
SEQUENCES_PER_CALL = 32


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}  # what generate() uses where a config sets none


def sampling_settings(model: nn.Module) -> dict[str, Any]:
    """Temperature, top-p and top-k as ``model.generate(do_sample=True)`` would sample: the model's
    ``generation_config``, transformers' defaults where it sets none. Spelt out, because TRL's
    GRPO trainer would otherwise sample with its own (top-k 0)."""
    config = getattr(model, "generation_config", None)
    return {key: type(default)(value if (value := getattr(config, key, None)) is not None else default)
            for key, default in SAMPLING_DEFAULTS.items()}


@contextmanager
def _left_padded(tokenizer) -> Iterator[None]:
    # a decoder continues from the last position of every row, so the padding goes on the left
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's (an end-of-turn token),
    as TRL's GRPO trainer stops on them."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [declared] if isinstance(declared, int) else list(declared or [])
    return list(dict.fromkeys([tokenizer.eos_token_id, *ids] if tokenizer.eos_token_id is not None else ids))


@torch.no_grad()
def complete(model: nn.Module, tokenizer, prompts: Sequence[str], *, k: int = 1, sample: bool = True,
             max_new_tokens: int = 128, max_length: int = 256, seed: int = 0) -> list[list[str]]:
    """``k`` completions of each prompt (the completion text alone, special tokens dropped):
    sampled with the model's settings from ``seed``, or greedy (``sample=False``, ``k`` 1)."""
    if not prompts or any(not p for p in prompts):
        raise ConfigError("generating completions needs a prompt in every row",
                          "give prompt/response data (a prompt field, a template or --chat)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    options = {"do_sample": sample, "max_new_tokens": max_new_tokens, "num_return_sequences": k,
               "pad_token_id": tokenizer.pad_token_id, "eos_token_id": _eos_ids(model, tokenizer)}
    if sample:
        options.update(sampling_settings(model))
    else:  # greedy: the sampling knobs a generation_config may carry would only draw warnings
        options.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # one seeded stream for the whole pass: same seed, same completions
    out: list[list[str]] = []
    try:
        with _left_padded(tokenizer):
            step = max(1, SEQUENCES_PER_CALL // k)
            for start in range(0, len(prompts), step):
                chunk = [clip_text(p, max_length) for p in prompts[start:start + step]]
                batch = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                  max_length=max_length).to(device)
                ids = model.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
                texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                out += [texts[i * k:(i + 1) * k] for i in range(len(chunk))]
    finally:
        torch.random.set_rng_state(generator_state)  # the caller's random stream is left as it was
        model.train(was_training)
    return out


def generated_examples(model: nn.Module, examples: Sequence[Example], tokenizer, *, k: int, max_new_tokens: int,
                       max_length: int, seed: int) -> list[Example]:
    """Each example's prompt with ``k`` of the model's own sampled completions as responses (the
    reference response is dropped): what an RL fine-tune will train on."""
    completions = complete(model, tokenizer, [e.prompt for e in examples], k=k, max_new_tokens=max_new_tokens,
                           max_length=max_length, seed=seed)
    return [Example(e.prompt, c) for e, group in zip(examples, completions) for c in group]


def generation_record(model: nn.Module, k: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    """How the diagnosed responses were made, for ``report.data["generated"]``."""
    return {"completions_per_prompt": k, "max_new_tokens": max_new_tokens, "seed": seed, "sampling": "model",
            **sampling_settings(model)}
