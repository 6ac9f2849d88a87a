"""``--shard``: real torchrun processes on gloo, each holding 1/N of the weights through FSDP2,
give the single-process report; what cannot be sharded is refused in one line; and FSDP training
through ``accelerate launch`` on CPU processes, which accelerate silently turns into DDP, is
refused instead of run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_distributed import ENV, ROOT, _free_port, ok, plop
from tiny_lm import make_tokenizer, save_tiny, write_jsonl

pytestmark = pytest.mark.spawns  # each test here starts torchrun or accelerate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shard")
    return {"model": save_tiny(root / "model"), "data": write_jsonl(root / "data.jsonl", 48)}


def assert_same_report(one: dict, par: dict) -> None:
    """NFN within float64 rounding (the denominators' squares are added in another order), the
    rest exactly: tokens, calls, maxima, ranking, recommendation and bootstrap."""
    assert [m["name"] for m in par["modules"]] == [m["name"] for m in one["modules"]]
    for a, b in zip(one["modules"], par["modules"]):
        assert b["nfn"] == pytest.approx(a["nfn"], rel=1e-12) and b["token_count"] == a["token_count"], a["name"]
        assert b["baseline"] == pytest.approx(a["baseline"], rel=1e-12), a["name"]
        assert (b["calls"], b["input_norm_max"]) == (a["calls"], a["input_norm_max"])
        if a.get("experts"):
            assert b["expert_nfn"] == pytest.approx(a["expert_nfn"], rel=1e-12)
    assert [t["type"] for t in par["types"]] == [t["type"] for t in one["types"]]
    assert [t["selection_probability"] for t in par["types"]] == [t["selection_probability"] for t in one["types"]]
    assert par["recommendation"] == one["recommendation"] and par["stability"] == one["stability"]
    assert (par["data"]["samples"], par["data"]["token_count"]) == (one["data"]["samples"], one["data"]["token_count"])
    assert par["model"] == one["model"] and par["coverage"] == one["coverage"]


@pytest.mark.parametrize("processes, options", [
    (2, ["--samples", "40", "--batch-size", "4"]),
    (3, ["--until-stable", "--batch-size", "2", "--per-layer"]),  # uneven shares, the until_stable stop
    (2, ["--samples", "16", "--batch-size", "4", "--dtype", "bfloat16"]),  # float32 file read into bfloat16 shards
])
def test_a_sharded_diagnosis_equals_one_process(tiny, tmp_path, processes, options):
    args = ["diagnose", tiny["model"], "--data", tiny["data"], *options, "--out"]
    ok(plop(*args, tmp_path / "one.json"))
    many = ok(plop(*args, tmp_path / "sharded.json", "--shard", processes=processes))
    one, par = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "sharded"))
    assert_same_report(one, par)
    assert par["settings"]["shard"] and not one["settings"]["shard"]
    assert many.stdout.count("report written to") == 1


SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
import archs, plop
from plop.utils.distributed import finish, init_from_env
from plop.model.sharding import held_bytes
from tiny_lm import examples, make_tokenizer

world = init_from_env()
model = archs.build({arch!r})
whole = held_bytes(model)
report = plop.diagnose(model, examples(24), make_tokenizer(), samples=24, batch_tokens=40, shard=True)
if world.is_main:
    report.save({out!r})
    json.dump({{"whole": whole, "held": held_bytes(model)}}, open({out!r} + ".bytes", "w"))
finish()
"""


@pytest.mark.parametrize("arch", ["mixtral", "t5"])
def test_the_python_api_shards_a_model_in_memory_moe_and_seq2seq_included(tmp_path, arch):
    """plop.diagnose(shard=True) shards a model built in each process in place: a tiny Mixtral
    (3-D expert weights, normed per expert on the process holding it) and a tiny T5 (encoder and
    decoder blocks, embeddings tied across both) equal the same diagnosis in this one process."""
    import archs
    import plop
    from tiny_lm import examples

    out = tmp_path / "sharded.json"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), arch=arch, out=str(out)))
    ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(_free_port()), str(script)], capture_output=True, text=True, env=ENV, timeout=240))
    one = plop.diagnose(archs.build(arch), examples(24), make_tokenizer(), samples=24, batch_tokens=40)
    par = json.loads(out.read_text())
    one = json.loads(one.to_json())
    assert bool([m for m in one["modules"] if m.get("experts")]) == (arch == "mixtral")
    assert_same_report(one, par)
    held = json.loads(Path(f"{out}.bytes").read_text())
    assert held["held"] < 0.6 * held["whole"]  # about half each, plus what is not split evenly


def test_shard_refuses_what_it_cannot_shard_in_one_line(tiny, tmp_path):
    one = plop("diagnose", tiny["model"], "--data", tiny["data"], "--samples", "8", "--shard", "--out",
               tmp_path / "r.json")
    assert one.returncode == 2 and "--shard needs several processes" in one.stderr, one.stderr
    scores = plop("diagnose", tiny["model"], "--data", tiny["data"], "--shard", "--weight-scores")
    assert scores.returncode == 2 and "weight_scores with shard" in scores.stderr, scores.stderr
    quantized = plop("diagnose", tiny["model"], "--data", tiny["data"], "--shard", "--quantize", "bnb-4bit")
    assert quantized.returncode == 2 and "--shard combines with neither --quantize" in quantized.stderr
    for proc in (one, scores, quantized):
        assert [line for line in proc.stderr.splitlines() if line.strip()] == \
            [line for line in proc.stderr.splitlines() if line.startswith("plop: error:")]


def test_a_checkpoint_stored_under_other_names_is_refused_not_half_loaded(tmp_path):
    """--shard reads the safetensors tensors by the model's own names. transformers 5 stores a
    Mixtral's experts one by one and fuses them into 3-D weights while loading, so its directory is
    refused by every process in one line, instead of running on uninitialised expert shards."""
    import archs

    archs.build("mixtral").save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    proc = plop("diagnose", tmp_path / "model", "--data", write_jsonl(tmp_path / "d.jsonl", 8), "--shard", "--out",
                tmp_path / "r.json", processes=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("plop: error:")]
    # each process refuses; the launcher may end the second before it has said so, so one line or two
    assert proc.returncode != 0 and 1 <= len(errors) <= 2, proc.stderr
    assert all("not in" in e and "experts.down_proj" in e and "MoE experts stored one by one" in e for e in errors)
    assert not (tmp_path / "r.json").exists()


FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: false
"""


def test_fsdp_training_through_accelerate_is_refused_on_cpu_processes(tiny, tmp_path):
    """accelerate launch with an FSDP config starts the processes, but accelerate 1.15 makes FSDP
    the distributed type only for GPU-like processes: on CPUs it would train plain DDP without a
    word. plop train stops every process with one line before the first step, and saves nothing."""
    (tmp_path / "fsdp.yaml").write_text(FSDP_CONFIG)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"),
         "--main_process_port", str(_free_port()), "-m", "plop.cli", "train", str(tiny["model"]), "--data",
         str(tiny["data"]), "--samples", "16", "--batch-size", "2", "--steps", "2", "--eval-fraction", "0",
         "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=ENV, timeout=240)
    errors = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.startswith("plop: error:")]
    # each process refuses; the launcher may end the second before it has said so, so one line or two
    assert proc.returncode != 0 and 1 <= len(errors) <= 2, proc.stderr
    assert all("enables FSDP only for GPU processes" in e for e in errors)
    assert not (tmp_path / "run" / "adapter_config.json").exists()


ZERO3_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: false
  zero3_save_16bit_model: true
  offload_optimizer_device: none
  offload_param_device: none
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
use_cpu: false
"""


def test_deepspeed_zero3_trains_on_cpu_processes_and_saves_the_whole_adapter(tiny, tmp_path):
    """DeepSpeed (its CPU accelerator, gloo) partitions the weights across two CPU processes; plop
    train runs two steps on the placement it diagnosed, skips the after-training NFN re-measurement
    (it merges a whole copy, which no process holds), and rank 0 saves the full adapter."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra: pip install 'plop[deepspeed]'")
    (tmp_path / "zero3.yaml").write_text(ZERO3_CONFIG)
    proc = ok(subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml"),
         "--main_process_port", str(_free_port()), "-m", "plop.cli", "train", str(tiny["model"]), "--data",
         str(tiny["data"]), "--samples", "16", "--batch-size", "2", "--steps", "2", "--eval-fraction", "0",
         "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=ENV, timeout=300))
    summary = json.loads((tmp_path / "run" / "plop_train_summary.json").read_text())
    assert (summary["world_size"], summary["steps"], summary["nfn_change"]) == (2, 2, None)
    assert proc.stdout.count("adapter written to") == 1

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), tmp_path / "run")
    report = json.loads((tmp_path / "run" / "plop_report.json").read_text())
    assert sorted(model.peft_config["default"].target_modules) == sorted(report["recommendation"]["target_modules"])
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * len(report["recommendation"]["types"])  # every adapted module of both layers
    assert all(p.abs().max() > 0 for p in lora_b.values())  # trained: LoRA's B starts at zero
