"""The report a fine-tune places its adapters by: the one given, or its own.

A run that names neither a report, modules nor a placement other than the recommendation is
placed by diagnosing its own training data first, with the run's length, batch, seed and rank.
That report is saved in the run directory (:data:`plop.finetune.config.REPORT_FILE`) and read back
on resume: a resumed run must keep the placement its checkpoints were trained on, whatever a new
diagnosis would say. ``plop.train`` and ``plop train`` both go through :func:`run_report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import DiagnoseConfig
from ..diagnosis import diagnose
from ..files.data import Example, take_sample
from ..ranking.report import Report
from ..utils.distributed import world
from .config import REPORT_FILE, TrainConfig


def needs_diagnosis(report: Report | None, target_modules, placement: str | None) -> bool:
    """Whether nothing given says where the adapters go, so the run diagnoses first."""
    return report is None and target_modules is None and placement in (None, "recommended")


def diagnosis_config(config: TrainConfig) -> DiagnoseConfig:
    """How a run diagnoses its own data: at its length, batch, seed and rank, else as plop diagnose."""
    return DiagnoseConfig(max_length=config.max_length, batch_size=config.batch_size, seed=config.seed,
                          rank=config.lora.r)


def run_report(model, tokenizer, examples: Sequence[Example], config: TrainConfig, *, report: Report | None = None,
               target_modules=None, placement: str | None = None, model_id: str | None = None,
               data_info: Mapping[str, Any] | None = None, progress: bool = True) -> tuple[Report | None, bool]:
    """``(report, fresh)``: ``report`` as given when anything says where the adapters go; else the
    one saved in the run directory when resuming; else a new diagnosis of ``examples``, saved
    there (``fresh``)."""
    if not needs_diagnosis(report, target_modules, placement):
        return report, False
    saved = config.run_dir / REPORT_FILE
    if config.resume and saved.is_file():
        return Report.load(saved), False
    return own_report(model, tokenizer, examples, config, config.run_dir, model_id=model_id, data_info=data_info,
                      progress=progress), True


def own_report(model, tokenizer, examples: Sequence[Example], config: TrainConfig, directory: str | Path | None, *,
               model_id: str | None = None, data_info: Mapping[str, Any] | None = None,
               progress: bool = True) -> Report:
    """A diagnosis of the run's own ``examples`` at its settings, saved in ``directory`` when given.
    Under a launched job every process diagnoses and gets the same report; rank 0 writes it."""
    report = diagnose(model, examples, tokenizer, diagnosis_config(config), model_id=model_id, data_info=data_info,
                      progress=progress)
    if directory is not None and world().is_main:
        report.save(Path(directory) / REPORT_FILE)
    return report


def diagnosed_rows(examples: Sequence[Example], report: Report | None, seed: int) -> list[str]:
    """The texts a placement came from: the report's seeded sample of ``examples`` (a run placed
    without one: as many as plop diagnose reads), for measuring NFN again after training."""
    rows = report.data["samples"] if report is not None else DiagnoseConfig.samples
    return [e.text for e in take_sample(examples, rows, seed)]
