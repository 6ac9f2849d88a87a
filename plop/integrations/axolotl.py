"""An axolotl plugin: plop places the LoRA adapters of an axolotl run.

    plugins:
      - plop.integrations.axolotl.PlopPlugin
    plop_diagnose: true          # or: plop_report: report.json

Modelled on axolotl's Spectrum plugin (``axolotl.integrations.spectrum``), which sets
``unfrozen_parameters`` before the model loads. plop needs the model itself, so with
``plop_diagnose`` it waits for axolotl's ``post_model_build`` hook: the base model is built (in
the run's dtype, quantization and attention) and no adapter is on it yet. It diagnoses that model
on a sample of the run's ``datasets`` and writes the placement into the config keys axolotl's
adapter loader reads next (``lora_target_modules``, ``lora_target_linear: false``, and
``lora_rank_pattern``/``lora_alpha_pattern``/``lora_target_parameters`` where the report has
them), keeping the run's ``lora_r``, ``lora_alpha`` and ``lora_dropout``. The report goes to
``OUTPUT_DIR/plop_report.json``. With ``plop_report`` the saved report is applied in
``pre_model_load``, as Spectrum does, and nothing is diagnosed.

Datasets are read raw with axolotl's own loader (local files, the hub, cloud storage) and
turned into TRL-format rows (:mod:`plop.files.trl_formats`): ``type: chat_template`` by its
``field_messages`` and message property mappings, ``type: completion`` by its ``field``, and
any other type when its rows already are in one of TRL's formats. Other prompt formats (alpaca,
input_output, ...) are refused with one line, since plop would not render them as axolotl does.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from ..config import DiagnoseConfig, Strategy
from ..diagnosis import diagnose
from ..errors import ConfigError, DataError
from ..files.data import Example
from ..finetune.config import REPORT_FILE
from ..files.trl_formats import FORMATS, detect_format, is_dataset, row_example
from ..placement import LoraSettings
from ..ranking.report import Report
from ..stacks import axolotl as axolotl_stack
from ..stacks.target import Target
from ..utils.distributed import world
from ..utils.untrusted import plain_safe


class PlopArgs(BaseModel):
    """The plugin's keys in an axolotl YAML (merged into axolotl's config schema)."""

    plop_diagnose: bool | None = None  # diagnose the base model on the run's datasets
    plop_report: str | None = None  # or use this saved report
    plop_samples: int | None = None  # rows sampled over all datasets (default: plop diagnose's)
    plop_until_stable: bool | None = None  # stop reading them once the recommendation is stable
    plop_tokens: Literal["all", "prompt", "response"] | None = None  # default: all
    plop_top_k: int | None = None
    plop_budget: int | None = None
    plop_allocate: bool | None = None
    plop_seed: int | None = None


def _trl_rows(ds, spec) -> Any:
    """A raw axolotl dataset as rows in one of TRL's formats (see the module's docstring)."""
    kind = spec.get("type")
    kind = kind if isinstance(kind, str) else None
    if kind == "chat_template":
        field = spec.get("field_messages") or "messages"
        mapping = spec.get("message_property_mappings") or {}
        role, content = mapping.get("role", "role"), mapping.get("content", "content")
        return [{"messages": [{"role": m[role], "content": m[content]} for m in row[field]]} for row in ds]
    if kind == "completion":
        return [{"text": row[spec.get("field") or "text"]} for row in ds]
    try:
        detect_format(ds.column_names)
    except DataError:
        fields = ", ".join(sorted(map(plain_safe, ds.column_names)))
        raise DataError(f"dataset {plain_safe(str(spec.get('path')))} (type {kind}) is in no format plop reads: "
                        f"its fields are {fields}", "plop reads type chat_template, type completion, or rows "
                        f"in TRL's formats: {'; '.join(FORMATS)}") from None
    return list(ds)


def sample_examples(cfg, tokenizer, samples: int, seed: int) -> list[Example]:
    """Up to ``samples`` examples drawn over the run's ``datasets`` (read with axolotl's own
    loader), each dataset's rows converted in its own format, so datasets of several formats mix."""
    import random

    from axolotl.utils.data.shared import load_dataset_with_config

    examples: list[Example] = []
    for spec in cfg.datasets or []:
        ds = load_dataset_with_config(spec, cfg.hf_use_auth_token)
        if not is_dataset(ds) and hasattr(ds, "keys"):  # a DatasetDict: axolotl trains on its train split
            ds = ds[spec.get("split") or "train"]
        picked = sorted(random.Random(seed).sample(range(len(ds)), min(len(ds), samples)))
        rows = _trl_rows(ds.select(picked), spec)  # converted after the draw: only sampled rows are read
        fmt = detect_format(rows[0]) if rows else "text"
        examples += [row_example(row, fmt, tokenizer, i) for i, row in zip(picked, rows)]
    if not examples:
        raise DataError("plop_diagnose: the axolotl config has no datasets to diagnose on")
    return random.Random(seed).sample(examples, min(samples, len(examples)))


@contextmanager
def unfused_attention(model) -> Iterator[None]:
    """axolotl's LoRA kernels (``lora_qkv_kernel``/``lora_o_kernel``, on by default for LoRA)
    rewrite the attention class's forward before the model is built, into one that calls
    ``self.apply_qkv``/``self.apply_o``, which axolotl binds only once the adapters are on. For
    the diagnosis, between the two, each such attention gets axolotl's own plain fallbacks
    (the q/k/v and o projections called as modules, so plop's hooks see them), removed after."""
    from axolotl.monkeypatch import lora_kernels as kernels

    bound = []
    for module in model.modules():
        if hasattr(type(module), "_original_forward") and not hasattr(module, "apply_qkv"):
            qkv = kernels.original_apply_qkv if getattr(module, "v_proj", None) is not None \
                else kernels.original_apply_qkv_optional_v
            module.apply_qkv = types.MethodType(qkv, module)
            module.apply_o = types.MethodType(kernels.original_apply_o, module)
            bound.append(module)
    try:
        yield
    finally:
        for module in bound:
            del module.apply_qkv, module.apply_o


def diagnose_run(cfg, model, tokenizer) -> Report:
    """Diagnose ``model`` on the run's data with the ``plop_*`` settings; save the report."""
    seed = cfg.plop_seed if cfg.plop_seed is not None else 0
    samples = cfg.plop_samples or DiagnoseConfig.samples
    settings: dict[str, Any] = {"tokens": cfg.plop_tokens or "all", "rank": cfg.lora_r or DiagnoseConfig.rank,
                                "seed": seed, "max_length": cfg.sequence_len or DiagnoseConfig.max_length,
                                "samples": samples, "until_stable": bool(cfg.plop_until_stable),
                                "strategy": Strategy.decode(top_k=cfg.plop_top_k, budget=cfg.plop_budget,
                                                            allocate=bool(cfg.plop_allocate))}
    examples = sample_examples(cfg, tokenizer, samples, seed)
    with unfused_attention(model):
        report = diagnose(model, examples, tokenizer, model_id=str(cfg.base_model), **settings)
    if world().is_main:  # every process of a multi-GPU run gets the same report; one writes it
        report.save(Path(cfg.output_dir or ".") / REPORT_FILE)
    return report


class PlopPlugin(BasePlugin):
    """Sets the run's LoRA targets from a plop diagnosis (``plop_diagnose``) or report (``plop_report``)."""

    def get_input_args(self) -> str:
        return "plop.integrations.axolotl.PlopArgs"

    def pre_model_load(self, cfg) -> None:
        if cfg.plop_diagnose and cfg.plop_report:
            raise ConfigError("set plop_diagnose or plop_report, not both")
        if cfg.plop_report:
            self._apply(cfg, Report.load(cfg.plop_report))

    def post_model_build(self, cfg, model) -> None:
        if not cfg.plop_diagnose:
            return
        from axolotl.loaders import load_tokenizer

        self._apply(cfg, diagnose_run(cfg, model, load_tokenizer(cfg)))

    @staticmethod
    def _apply(cfg, report: Report) -> None:
        if cfg.adapter not in ("lora", "qlora"):
            raise ConfigError(f"plop places LoRA adapters: set adapter: lora or qlora, not {cfg.adapter!r}")
        for key, value in axolotl_stack.placement_keys(Target(report, LoraSettings(cfg.lora_r, cfg.lora_alpha))).items():
            cfg[key] = value
