"""Checks that need CUDA (run on a GPU machine; CI never runs it).

A LLaMA-shaped model (random weights, 12 layers, hidden 1024) saved once, then diagnosed as:

  float32 on the GPU                 the reference
  bfloat16                           norms in float32: NFN within 2 % of float32
  device_map split GPU + CPU         the same NFN as on one device (accumulated on the CPU)
  bitsandbytes 8-bit and 4-bit       quantized weights: dequantized-weight baseline, NFN close to float32
                                     (the quantization itself moves the weights, hence a looser bound)

and the time of a diagnosis against a plain no-grad forward in bfloat16, on that model and on a wide
one (hidden 4096) where the GPU, not the hooks' kernel launches, sets the pace. Prints one line per check
and writes $OUT/gpu_check.json (or benchmarks/results/gpu_check.json).

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from plop import diagnose


def nfn(report) -> np.ndarray:
    return np.array([m.nfn for m in report.modules])


def batches(n: int = 8, seq: int = 256, vocab: int = 32000) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (8, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, seq // 2 :] = 0  # half the rows right-padded
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def time_against_forward(model, data, label: str) -> dict:
    """Best of three: a plain no-grad forward (logits included) vs a diagnosis, same batches."""
    def forward() -> None:
        with torch.no_grad():
            for b in data:
                model(**{k: v.cuda() for k, v in b.items()}, use_cache=False)

    forward()
    diagnose(model, data)  # warm-up both
    t_forward = min(timed(forward) for _ in range(3))
    t_diagnose = min(timed(lambda: diagnose(model, data)) for _ in range(3))
    print(f"bf16 timing, {label}: forward {t_forward:.3f} s, diagnose {t_diagnose:.3f} s, "
          f"ratio {t_diagnose / t_forward:.2f}")
    return {"model": label, "forward_s": t_forward, "diagnose_s": t_diagnose, "ratio": t_diagnose / t_forward}


def main() -> None:
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    data = batches()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                             num_attention_heads=16, num_key_value_heads=4)
        LlamaForCausalLM(config).save_pretrained(tmp)

        def load(**kwargs):
            return AutoModelForCausalLM.from_pretrained(tmp, **kwargs)

        ref = diagnose(load(dtype=torch.float32, device_map="cuda"), data)
        base = nfn(ref)

        def check(name: str, report, bound: float) -> None:
            rel = float(np.max(np.abs(nfn(report) - base) / base))
            same_top = report.recommendation.types == ref.recommendation.types
            results[name] = {"max_rel_diff": rel, "bound": bound, "ok": rel <= bound, "same_recommendation": same_top}
            print(f"{name:>12}: max relative NFN difference vs float32 {rel:.4f} (bound {bound}) "
                  f"{'ok' if rel <= bound else 'FAILED'}; same recommendation: {same_top}")

        bf16 = load(dtype=torch.bfloat16, device_map="cuda")
        check("bfloat16", diagnose(bf16, data), 0.02)
        split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": "cpu", "lm_head": "cpu",
                 **{f"model.layers.{i}": 0 if i < 6 else "cpu" for i in range(12)}}
        check("gpu+cpu", diagnose(load(dtype=torch.float32, device_map=split), data), 1e-4)
        try:
            from transformers import BitsAndBytesConfig

            check("bnb-8bit", diagnose(load(quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                            device_map="cuda"), data), 0.05)
            check("bnb-4bit", diagnose(load(quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map="cuda"), data), 0.15)
        except ImportError as e:
            results["bnb"] = f"skipped: {e}"
            print(f"bitsandbytes: skipped ({e})")

        results["timing_bf16"] = time_against_forward(bf16, data, "hidden 1024 x 12 layers, 8 x 256 tokens")
        del bf16
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=6, num_attention_heads=32, num_key_value_heads=8))
    results["timing_bf16_wide"] = time_against_forward(wide.to("cuda", torch.bfloat16), batches(seq=1024),
                                                       "hidden 4096 x 6 layers, 8 x 1024 tokens")

    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
