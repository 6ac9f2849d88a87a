"""``plop.diagnose``: one no-grad pass over a small data subset -> :class:`~plop.report.Report`."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .collector import NFNCollector, find_linear_modules, layer_index, module_type
from .ranker import STABLE_AGREEMENT, ModuleRecord, Selector, placement_costs, rank_types
from .report import Report

AUTO_MIN_SAMPLES = 16


@dataclass
class DiagnoseConfig:
    """Settings of a diagnosis; all of them are recorded in the report.

    ``samples``: how many rows to use (``None``: all; ``"auto"``: stop as soon as the bootstrap
    says the recommendation is stable, after at least 16). ``estimator``: ``"closed_form"``
    (exact ``||W||_F / sqrt(d_in)`` denominator, no extra compute) or ``"monte_carlo"``.
    ``strategy``: ``"top_k"``, ``"budget"`` (needs ``budget``, trainable parameters at
    ``rank``) or ``"per_layer"``.
    """

    samples: int | Literal["auto"] | None = None
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    estimator: Literal["closed_form", "monte_carlo"] = "closed_form"
    strategy: Literal["top_k", "budget", "per_layer"] = "top_k"
    top_k: int = 3
    budget: int | None = None
    rank: int = 16
    n_bootstrap: int = 200
    include_head: bool = False

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "top_k", "rank", "n_bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.samples is not None and self.samples != "auto" and (
            not isinstance(self.samples, int) or self.samples < 1
        ):
            raise ValueError(f"samples must be a positive integer or 'auto', got {self.samples!r}")


def _forward_target(model: nn.Module, include_head: bool) -> nn.Module:
    """The module to call: the body without the output head, so no logits are computed."""
    if not include_head:
        body = getattr(model, "base_model", None)
        if isinstance(body, nn.Module) and body is not model and hasattr(body, "get_input_embeddings"):
            return body
    return model


def _input_device(model: nn.Module) -> torch.device:
    if hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        return model.get_input_embeddings().weight.device
    return next(model.parameters()).device


def _batches(
    data: Sequence[str] | Iterable[Mapping[str, torch.Tensor]], tokenizer, config: DiagnoseConfig
) -> Iterator[Mapping[str, torch.Tensor]]:
    """Token batches: strings are tokenized here (right padding, so a text's positions do not
    depend on its batch-mates); mappings with ``input_ids`` pass through."""
    if isinstance(data, Sequence) and data and isinstance(data[0], str):
        if tokenizer is None:
            raise ValueError("diagnosing raw text needs a tokenizer")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        for i in range(0, len(data), config.batch_size):
            yield tokenizer(
                list(data[i : i + config.batch_size]), padding=True, truncation=True,
                max_length=config.max_length, return_tensors="pt", padding_side="right",
            )
    else:
        left = config.samples if isinstance(config.samples, int) else None  # rows, not batches
        for batch in data:
            if "input_ids" not in batch:
                raise ValueError("each batch must hold 'input_ids' (and ideally 'attention_mask')")
            if left is not None:
                if left <= 0:
                    return
                if len(batch["input_ids"]) > left:
                    batch = {k: v[:left] for k, v in batch.items()}
                left -= len(batch["input_ids"])
            yield batch


def _records(collector: NFNCollector) -> list[ModuleRecord]:
    records = []
    for name, s in collector.stats.items():
        if s.count == 0:
            continue  # never called by this forward (an unused head, a pooler the body skips)
        records.append(
            ModuleRecord(
                name=name, type=module_type(name), layer=layer_index(name), d_out=s.shape[0], d_in=s.shape[1],
                nfn=float(s.nfn), nfn_std=s.nfn_std, tokens=s.count, calls=s.calls, baseline=float(s.denominator),
                input_norm_mean=float(s.input_norm_mean), input_norm_max=s.input_norm_max,
                output_norm_mean=float(s.output_norm_mean),
            )
        )
    return records


def _replicates(collector: NFNCollector, records: Sequence[ModuleRecord]) -> np.ndarray:
    return np.stack([collector.stats[m.name].bootstrap_nfn() for m in records])


def _samples_to_stable(checkpoints: list[tuple[int, frozenset]]) -> int | None:
    """Samples seen at the first checkpoint after which the selection never changed."""
    if not checkpoints:
        return None
    final = checkpoints[-1][1]
    first = len(checkpoints) - 1
    while first > 0 and checkpoints[first - 1][1] == final:
        first -= 1
    return checkpoints[first][0]


def _model_info(model: nn.Module, model_id: str | None) -> dict[str, Any]:
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "id": model_id or getattr(config, "_name_or_path", "") or type(model).__name__,
        "architecture": archs[0],
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def _progress(total: int | None, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(
        TextColumn("[bold]diagnosing[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
        TextColumn("{task.fields[tps]:>8.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), disable=not enabled, console=Console(stderr=True),  # stdout may carry --json
    )


@torch.no_grad()
def diagnose(
    model: nn.Module,
    data: Sequence[str] | Iterable[Mapping[str, torch.Tensor]],
    tokenizer=None,
    config: DiagnoseConfig | None = None,
    *,
    model_id: str | None = None,
    data_info: Mapping[str, Any] | None = None,
    progress: bool = False,
    **overrides,
) -> Report:
    """Diagnose where LoRA should go, in one streaming forward pass without gradients.

    For every linear module ``W`` it measures
    ``NFN(W) = mean_t ||W z_t|| / ||z_t||  /  (||W||_F / sqrt(d_in))`` over the task's tokens
    ``z_t`` (see :mod:`plop.nfn`), ranks module types by mean NFN over layers and recommends the
    lowest ones.

    Args:
        model: a transformers model (or any ``nn.Module`` taking ``input_ids``/``attention_mask``).
        data: texts (tokenized here with ``tokenizer``) or an iterable of token batches.
        config: a :class:`DiagnoseConfig`; keyword ``overrides`` replace its fields.
        model_id, data_info: recorded in the report (``data_info`` merges into ``report.data``).
        progress: show a progress bar with tokens/s and ETA.
    """
    config = DiagnoseConfig(**{**asdict(config or DiagnoseConfig()), **overrides})
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if len(data) == 0:
            raise ValueError("no data to diagnose on")
        if isinstance(data[0], str):
            if isinstance(config.samples, int):
                data = data[: config.samples]
            total = len(data)
        else:  # token batches: samples and the progress total count rows, see _batches
            total = None
    else:
        total = None

    modules = find_linear_modules(model, include_head=config.include_head)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no linear modules (nn.Linear or Conv1D) to diagnose")
    target = _forward_target(model, config.include_head)
    call_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(target.forward).parameters else {}
    device = _input_device(model)
    was_training = model.training
    model.eval()
    checkpoints: list[tuple[int, frozenset]] = []
    selector = None
    start = time.perf_counter()
    try:
        with NFNCollector(modules, estimator=config.estimator, n_bootstrap=config.n_bootstrap,
                          seed=config.seed) as collector, _progress(total, progress) as bar:
            task = bar.add_task("diagnose", total=total, tps=0.0)
            for batch in _batches(data, tokenizer, config):
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                if mask is None:
                    mask = torch.ones_like(ids)
                collector.start_batch(mask)
                target(input_ids=ids.to(device), attention_mask=mask.to(device), **call_kwargs)
                collector.flush()
                records = _records(collector)
                # rebuilt per batch: a module first called late must still be costed and ranked
                selector = Selector(records, config.strategy, top_k=config.top_k, budget=config.budget,
                                    rank=config.rank)
                checkpoints.append((collector.samples, selector(np.array([m.nfn for m in records]))))
                bar.update(task, advance=ids.shape[0], tps=collector.tokens / (time.perf_counter() - start))
                if config.samples == "auto" and collector.samples >= AUTO_MIN_SAMPLES:
                    rec, _ = selector.recommend(_replicates(collector, records))
                    if rec.stable:
                        break
            if selector is None:
                raise ValueError("no data to diagnose on")
            replicates = _replicates(collector, records)
            samples, tokens = collector.samples, collector.tokens
    finally:
        model.train(was_training)

    types = rank_types(records)
    recommendation, probabilities = selector.recommend(replicates)
    recommendation.samples_to_stable = _samples_to_stable(checkpoints)
    for t in types:
        t.selection_probability = None if probabilities is None else probabilities.get(t.type)
    return Report(
        model=_model_info(model, model_id),
        data={"source": "in-memory", **(data_info or {}), "samples": samples, "tokens": tokens,
              "seconds": round(time.perf_counter() - start, 3)},
        settings=asdict(config),
        modules=records,
        types=types,
        recommendation=recommendation,
        costs=placement_costs(records, config.rank, recommendation),
        stability={
            "n_bootstrap": config.n_bootstrap,
            "agreement": recommendation.agreement,
            "stable": recommendation.stable,
            "threshold": STABLE_AGREEMENT,
            "samples_to_stable": recommendation.samples_to_stable,
            # per-layer selections are module lists; the type-level history is what reads well
            "checkpoints": [] if config.strategy == "per_layer" else [[n, sorted(s)] for n, s in checkpoints],
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
