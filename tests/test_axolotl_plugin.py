"""The axolotl plugin, through axolotl's own entry point on the CPU.

``python -m axolotl.cli.train config.yml`` runs, on a tiny local LLaMA: axolotl's config loading
and validation (with the plugin's keys merged into its schema), its dataset preprocessing, its
model build with its patches (LoRA kernels included), the plugin's hooks, PEFT's adapter build,
two (or one) training steps of axolotl's trainer and the adapter save. What is not exercised:
GPUs, multi-GPU (FSDP/DeepSpeed), quantized (QLoRA) bases and hub downloads. Each run is a child
process: axolotl patches transformers' classes process-wide, which would leak into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("axolotl")
datasets = pytest.importorskip("datasets")

from safetensors import safe_open  # noqa: E402

from plop import DataError, Report, diagnose  # noqa: E402
from plop.finetune.config import REPORT_FILE  # noqa: E402
from plop.integrations.axolotl import _trl_rows  # noqa: E402
from plop.placement import LoraSettings  # noqa: E402
from plop.stacks.axolotl import placement_keys  # noqa: E402
from plop.stacks.target import Target  # noqa: E402
from tiny_lm import make_chat_tokenizer, save_tiny  # noqa: E402

QUESTIONS = [(f"What is {a} plus {b}?", f"It is {a + b}.") for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model with a chat template and a conversational JSONL dataset."""
    path = tmp_path_factory.mktemp("axolotl")
    save_tiny(path / "model")
    make_chat_tokenizer().save_pretrained(path / "model")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    (path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(workdir, out, steps: int = 2, **plop) -> dict:
    return {
        "base_model": str(workdir / "model"), "plugins": ["plop.integrations.axolotl.PlopPlugin"], **plop,
        "datasets": [{"path": str(workdir / "chat.jsonl"), "type": "chat_template", "ds_type": "json"}],
        "chat_template": "tokenizer_default", "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "sequence_len": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": steps,
        "num_epochs": 1, "learning_rate": 1e-3, "optimizer": "adamw_torch", "lr_scheduler": "constant",
        "output_dir": str(out), "dataset_prepared_path": str(out.parent / f"{out.name}-prepared"),
        "val_set_size": 0, "bf16": False, "fp16": False, "tf32": False, "save_strategy": "no",
    }


def _train(config: dict, cwd) -> subprocess.CompletedProcess:
    path = cwd / f"{os.path.basename(config['output_dir'])}.yml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(path)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _adapted(out) -> set[str]:
    """The modules the saved adapter holds LoRA weights for (names in the base model), and
    whether training moved every B matrix off its zero start."""
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)  # trained, not just built
    return {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}


def test_plop_diagnose_places_the_adapters_axolotl_trains(workdir):
    out = workdir / "diagnosed"
    run = _train(_config(workdir, out, plop_diagnose=True, plop_samples=16), workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    report = Report.load(out / REPORT_FILE)  # written next to the run's output
    assert report.data["samples"] == 16 and report.model["id"] == str(workdir / "model")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(report.recommendation.target_modules)
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)  # the run's own rank and alpha
    assert _adapted(out) == set(report.recommendation.modules)
    assert len(report.recommendation.modules) == 6  # 3 of 7 types, both layers: not all-linear


def test_plop_report_sets_targets_and_allocated_ranks(workdir, tmp_path):
    """A saved allocate report: its types at its ranks per type, alpha/rank kept at the run's 2."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    rows = [json.loads(line) for line in (workdir / "chat.jsonl").read_text().splitlines()]
    report = diagnose(model, rows, make_chat_tokenizer(), strategy="allocate", rank=4, top_k=2, n_bootstrap=20)
    report.save(tmp_path / "saved.json")
    out = workdir / "from-report"
    run = _train(_config(workdir, out, steps=1, plop_report=str(tmp_path / "saved.json")), workdir)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(report.recommendation.target_modules)
    assert adapter["rank_pattern"] == report.recommendation.rank_pattern
    assert adapter["alpha_pattern"] == {t: 2 * r for t, r in report.recommendation.rank_pattern.items()}
    assert _adapted(out) == set(report.recommendation.modules)
    assert not (out / REPORT_FILE).exists()  # nothing diagnosed


def test_placement_keys_and_refused_formats(workdir):
    model_rows = [{"instruction": "add", "input": "1 1", "output": "2"}] * 3
    with pytest.raises(DataError, match=r"^dataset a\.json \(type alpaca\) is in no format plop reads: its fields "
                                        r"are input, instruction, output \(plop reads type chat_template, "
                                        r"type completion, or rows in TRL's formats: language modeling"):
        _trl_rows(datasets.Dataset.from_list(model_rows), {"path": "a.json", "type": "alpaca"})
    completion = _trl_rows(datasets.Dataset.from_list([{"body": "some text"}]), {"type": "completion", "field": "body"})
    assert completion == [{"text": "some text"}]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    report = diagnose(model, completion * 8, make_chat_tokenizer(), n_bootstrap=10)
    assert placement_keys(Target(report, LoraSettings(8, 16))) == {"lora_target_modules": report.recommendation.target_modules,
                                                 "lora_target_linear": False}
