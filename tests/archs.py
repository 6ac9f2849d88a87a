"""A sweep of tiny random-weight transformers models, one per architecture people fine-tune.

Each model is built in-process from its config (no download): hidden size 32-64, 2 layers, 4
experts for MoE models, a 256-token vocabulary. ``build(name)`` returns the model, ``inputs(name,
batch)`` the keyword arguments its forward needs for a token batch, and ``projections(model)``
every weight-bearing projection: ``nn.Linear``, GPT-2's ``Conv1D`` and the 3-D expert parameters
of transformers 5 MoE blocks (``mlp.experts.gate_up_proj`` / ``down_proj``).

Token ids in batches must stay below ``SAFE_VOCAB``: the ids above it are the VLMs' special
image/video tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

VOCAB = 256
SAFE_VOCAB = 240  # ids >= this are special tokens (image, video, ...) in the VLM configs
SEED = 1234

# Sizes almost every decoder config understands; a config ignores (stores) the ones it lacks.
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, pad_token_id=0)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
               patch_size=14, projection_dim=32)


@dataclass(frozen=True)
class Arch:
    """How to build one architecture: ``kind`` is ``causal``, ``seq2seq``, ``encoder`` or ``vlm``."""

    model_type: str
    kind: str
    sizes: dict = field(default_factory=dict)


def _vlm(model_type: str, text: dict, vision: dict | None = None, **top) -> Arch:
    return Arch(model_type, "vlm", dict(text_config=text, vision_config={**_VISION, **(vision or {})}, **top))


ARCHS: dict[str, Arch] = {
    # dense decoders
    "llama": Arch("llama", "causal", _TEXT),
    "mistral": Arch("mistral", "causal", _TEXT),
    "qwen2": Arch("qwen2", "causal", _TEXT),
    "qwen3": Arch("qwen3", "causal", _TEXT),
    "gemma": Arch("gemma", "causal", _TEXT),
    "gemma2": Arch("gemma2", "causal", _TEXT),
    "gemma3_text": Arch("gemma3_text", "causal", {**_TEXT, "query_pre_attn_scalar": 8}),
    "phi": Arch("phi", "causal", _TEXT),
    "phi3": Arch("phi3", "causal", _TEXT),
    "gpt2": Arch("gpt2", "causal", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                        bos_token_id=1, eos_token_id=2)),
    "gpt_neox": Arch("gpt_neox", "causal", _TEXT),
    "gptj": Arch("gptj", "causal", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                        rotary_dim=4)),
    "falcon": Arch("falcon", "causal", {**{k: v for k, v in _TEXT.items() if k != "head_dim"}, "num_kv_heads": 2,
                                        "new_decoder_architecture": True}),
    "bloom": Arch("bloom", "causal", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    "opt": Arch("opt", "causal", {**_TEXT, "ffn_dim": 64, "word_embed_proj_dim": 32}),
    "starcoder2": Arch("starcoder2", "causal", _TEXT),
    "olmo2": Arch("olmo2", "causal", _TEXT),
    "cohere": Arch("cohere", "causal", _TEXT),
    # mixture of experts
    "mixtral": Arch("mixtral", "causal", {**_TEXT, **_MOE}),
    "qwen2_moe": Arch("qwen2_moe", "causal", {**_TEXT, **_MOE}),
    "qwen3_moe": Arch("qwen3_moe", "causal", {**_TEXT, **_MOE}),
    "olmoe": Arch("olmoe", "causal", {**_TEXT, **_MOE}),
    "gpt_oss": Arch("gpt_oss", "causal", {**_TEXT, **_MOE, "intermediate_size": 32, "sliding_window": 16,
                                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    # top-2 routing (Scout routes top-1): two nonzero rows per token test the routing plop reconstructs
    "llama4_text": Arch("llama4_text", "causal", {**_TEXT, **_MOE, "intermediate_size": 32,
                                                  "intermediate_size_mlp": 64, "interleave_moe_layer_step": 1}),
    "deepseek_v3": Arch("deepseek_v3", "causal", {
        **_TEXT, **_MOE, "n_routed_experts": 4, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
        "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "num_key_value_heads": 4, "num_mtp_layers": 0}),
    # hybrid and state-space
    "jamba": Arch("jamba", "causal", {**_TEXT, **_MOE, "attn_layer_period": 2, "attn_layer_offset": 1,
                                      "expert_layer_period": 2, "expert_layer_offset": 1,
                                      "mamba_d_state": 4, "mamba_dt_rank": 4}),
    "mamba": Arch("mamba", "causal", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4,
                                          time_step_rank=4)),
    # encoders
    "bert": Arch("bert", "encoder", _ENCODER),
    "roberta": Arch("roberta", "encoder", {**_ENCODER, "pad_token_id": 1}),
    "deberta-v2": Arch("deberta-v2", "encoder", _ENCODER),
    "modernbert": Arch("modernbert", "encoder", {**_ENCODER, "global_attn_every_n_layers": 1, "bos_token_id": 1,
                                                "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2}),
    # encoder-decoders
    "t5": Arch("t5", "seq2seq", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     decoder_start_token_id=0)),
    "bart": Arch("bart", "seq2seq", _BART),
    "mbart": Arch("mbart", "seq2seq", _BART),
    # vision-language models, run on text only
    "llava": _vlm("llava", {**_TEXT, "model_type": "llama"}, {"model_type": "clip_vision_model"},
                  image_token_index=VOCAB - 1, image_seq_length=4),
    "qwen2_vl": _vlm("qwen2_vl", {**_TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2]}},
                     {"depth": 2, "embed_dim": 32, "num_heads": 4, "hidden_size": 32},
                     image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
                     vision_end_token_id=VOCAB - 4),
    "gemma3": _vlm("gemma3", {**_TEXT, "query_pre_attn_scalar": 8}, {"model_type": "siglip_vision_model"},
                   mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                   image_token_index=VOCAB - 1),
}


def config(name: str):
    from transformers import AutoConfig

    arch = ARCHS[name]
    return AutoConfig.for_model(arch.model_type, **arch.sizes)


def build(name: str, seed: int = SEED) -> nn.Module:
    """The tiny model ``name`` in eval mode, its weights drawn from ``seed``."""
    import transformers

    transformers.logging.set_verbosity_error()  # tiny sizes trip harmless config warnings
    auto = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM", "encoder": "AutoModel",
            "vlm": "AutoModelForImageTextToText"}[ARCHS[name].kind]
    torch.manual_seed(seed)
    return getattr(transformers, auto).from_config(config(name)).eval()


def inputs(name: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward keyword arguments for a token batch: encoder-decoders also get the batch as the
    decoder's input (teacher forcing on the same tokens); VLMs get text only."""
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if ARCHS[name].kind == "seq2seq":
        out["decoder_input_ids"] = batch["input_ids"]
        out["decoder_attention_mask"] = batch["attention_mask"]
    return out


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def projections(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every weight-bearing projection by full name: ``(kind, weight shape)`` with kind
    ``linear``, ``conv1d`` or ``experts`` (a 3-D ``(experts, ., .)`` parameter, named
    ``<module>.<parameter>``)."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            found[name] = ("conv1d" if is_conv1d(module) else "linear", tuple(module.weight.shape))
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and pname.endswith("proj"):
                found[f"{name}.{pname}"] = ("experts", tuple(param.shape))
    return found
