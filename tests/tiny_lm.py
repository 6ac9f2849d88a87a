"""A tiny causal LM with a character tokenizer, built offline in milliseconds, for training tests.

The tokenizer maps every printable ASCII character (and newline) to one token and prepends
``<s>``; the model is a 2-layer LLaMA of width 32 over that vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from plop.files.data import Example

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def make_tokenizer():
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    # BPE without merges: every character is its own token
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


# A minimal chat template for TRL's and axolotl's conversational formats (one token per character).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_chat_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def save_tiny(path: Path, seed: int = 0) -> Path:
    """Model and tokenizer in ``path``, loadable with ``from_pretrained`` (and by ``plop``)."""
    make_model(seed).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def examples(n: int = 48) -> list[Example]:
    """Short, repetitive prompt/response pairs: a tiny model learns them within a few dozen steps."""
    pairs = [(f"Q: {a}+{b}?\nA: ", f"{a + b}") for a in range(4) for b in range(4)]
    return [Example(*pairs[i % len(pairs)]) for i in range(n)]


def write_jsonl(path: Path, n: int = 48) -> Path:
    import json

    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples(n)))
    return path
