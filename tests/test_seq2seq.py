"""Encoder-decoder models: the decoder is diagnosed on the response (or the shifted input), every
stream's padding is excluded by its own mask, and ``plop.train`` fine-tunes them as SEQ_2_SEQ_LM."""

from __future__ import annotations

import pytest

import archs
import tiny_lm
from plop import diagnose
from plop.files.data import Example
from plop.finetune.config import TrainConfig
from plop.placement import LoraSettings
from plop.finetune.trainer import train

PAIRS = [Example("Q: 1+2?", "3"), Example("Q: what is 12+30?", "42, since 12+30=42"), Example("", "plain text")]


def _tokens(tokenizer, texts) -> int:
    return sum(len(tokenizer(t)["input_ids"]) for t in texts)


@pytest.mark.parametrize("name, q, cross", [("t5", "SelfAttention.q", "EncDecAttention.k"),
                                            ("bart", "self_attn.q_proj", "encoder_attn.k_proj")])
def test_the_decoder_reads_the_response_and_the_encoder_the_prompt(name, q, cross):
    tokenizer = tiny_lm.make_tokenizer()
    report = diagnose(archs.build(name), PAIRS, tokenizer, n_bootstrap=10)
    modules = {m.name: m for m in report.modules}
    encoder = next(m for n, m in modules.items() if n.startswith(("encoder.", "model.encoder.")) and n.endswith(q))
    decoder = next(m for n, m in modules.items() if n.startswith(("decoder.", "model.decoder.")) and n.endswith(q))
    keys = next(m for n, m in modules.items() if n.endswith(cross))
    sources = [e.prompt or e.response for e in PAIRS]
    assert encoder.token_count == keys.token_count == _tokens(tokenizer, sources)  # cross-attention reads the encoder
    assert decoder.token_count == _tokens(tokenizer, [e.response for e in PAIRS])
    assert report.coverage["share"] == 1.0
    assert report.task_type == "SEQ_2_SEQ_LM"


def test_texts_are_decoded_from_their_shifted_selves():
    tokenizer = tiny_lm.make_tokenizer()
    texts = [e.text for e in PAIRS]
    report = diagnose(archs.build("t5"), texts, tokenizer, n_bootstrap=10)
    tokens = {m.name: m.token_count for m in report.modules}
    assert tokens["decoder.block.0.layer.0.SelfAttention.q"] == tokens["encoder.block.0.layer.0.SelfAttention.q"] \
        == _tokens(tokenizer, texts)


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_train_fine_tunes_an_encoder_decoder(name, tmp_path):
    tokenizer = tiny_lm.make_tokenizer()
    model = archs.build(name)
    config = TrainConfig(lora=LoraSettings(r=4), steps=3, batch_size=4, output_dir=str(tmp_path), lr=1e-2)
    result = train(model, tokenizer, tiny_lm.examples(16), config, placement="attention", progress=False)
    assert result.model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    losses = [p["loss"] for p in result.summary["loss_curve"]]
    assert losses and all(loss == loss for loss in losses)  # finite, labels on the response tokens
    assert result.eval_after["loss"] < result.eval_before["loss"]
