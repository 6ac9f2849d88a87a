"""``plop.diagnose``: one no-grad pass over a small data subset -> :class:`~plop.ranking.report.Report`."""

from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import DiagnoseConfig
from .errors import ConfigError, DataError, ModelError
from .files.data import take_sample
from .files.reward import load_reward
from .files.trl_formats import dataset_examples, is_dataset, model_tokenizer
from .measure import sharded
from .measure.batching import Batch, default_batch_tokens, example_batches, text_batches, token_batches
from .measure.collector import NFNCollector
from .measure.data_parallel import GlobalState, data_parallel_passes
from .measure.experts import ExpertStats, ExpertWeightStats
from .measure.generate import generated_examples, generation_record
from .measure.grad_sign import grad_sign_scores, group_advantages
from .measure.seq2seq import is_encoder_decoder, model_inputs, pair_batches
from .measure.weight_scores import weight_scores
from .model import sharding
from .model.coverage import coverage
from .model.experts import find_experts
from .model.layers import body, dense_weight, find_linear_modules
from .model.loading import ensure_pad_token, model_info, model_layout
from .model.names import layer_index
from .model.layout import ModelLayout
from .ranking.placements import placement_costs, recommendation_targets
from .ranking.ranker import STABLE_AGREEMENT, Selector, data_free_choices, rank_types, signal_values
from .ranking.report import ModuleRecord, Report
from .utils.distributed import world
from .utils.untrusted import clip_text

Checkpoint = tuple[int, frozenset]  # (samples seen, selection after that batch)


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    module = embeddings if embeddings is not None else model
    device = next(module.parameters()).device
    if device.type == "meta":  # offloaded by accelerate: its hook runs the module on its execution device
        return torch.device(getattr(getattr(module, "_hf_hook", None), "execution_device", None) or "cpu")
    return device


def _is_texts(data) -> bool:
    return isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and bool(data) and isinstance(data[0], str)


def _is_examples(data) -> bool:
    return isinstance(data, Sequence) and bool(data) and hasattr(data[0], "prompt") and hasattr(data[0], "response")


def _batches(data: Sequence[str] | Iterable[Mapping[str, torch.Tensor]], tokenizer,
             config: DiagnoseConfig) -> Iterator[Batch]:
    """Texts and examples scored on some of their tokens become length-sorted batches under the
    token budget (:mod:`plop.measure.batching`); token batches (``input_ids`` and ideally
    ``attention_mask``) pass through."""
    if not (_is_texts(data) or _is_examples(data)):
        return token_batches(data, config.samples)
    if tokenizer is None:
        raise ConfigError("diagnosing text needs a tokenizer")
    ensure_pad_token(tokenizer)
    if _is_examples(data):
        return example_batches(data, tokenizer, max_length=config.max_length, batch_tokens=config.batch_tokens,
                               tokens=config.tokens)
    return text_batches(data, tokenizer, max_length=config.max_length, batch_tokens=config.batch_tokens)


def _batch_tokens(model: nn.Module, config: DiagnoseConfig, device: torch.device) -> int:
    """``config.batch_tokens``, or the default for this device (see :func:`default_batch_tokens`)."""
    if config.batch_tokens is not None:
        return config.batch_tokens
    if device.type != "cuda":
        return default_batch_tokens(config.batch_size, config.max_length)
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    width = max(getattr(text, "hidden_size", 0) or 0, getattr(text, "intermediate_size", 0) or 0)
    element = next(model.parameters()).element_size()
    return default_batch_tokens(config.batch_size, config.max_length, free_bytes=torch.cuda.mem_get_info(device)[0],
                                width=width, element_bytes=element)


def _records(state: GlobalState, types: Mapping[str, str]) -> list[ModuleRecord]:
    """One record per module (and 3-D expert weight) the forward reached, typed by its role."""
    records = []
    for name, s in state.stats.items():
        if s.count == 0:
            continue  # never called by this forward (an unused head, a pooler the body skips)
        records.append(
            ModuleRecord(
                name=name, type=types[name], layer=layer_index(name), d_out=s.shape[0], d_in=s.shape[1],
                nfn=float(s.nfn), nfn_std=s.nfn_std, token_count=s.count, calls=s.calls, baseline=float(s.denominator),
                input_norm_mean=float(s.input_norm_mean), input_norm_max=s.input_norm_max,
                output_norm_mean=float(s.output_norm_mean),
            )
        )
    return records + [_expert_record(s, types[name]) for name, s in state.experts.items() if s.tokens]


def _expert_record(s: ExpertWeightStats, type_: str) -> ModuleRecord:
    """A stacked expert weight as one record: its NFN is the routed tokens' (see plop.measure.experts),
    its baseline the experts' mean, and ``expert_nfn`` the breakdown (None: no token routed)."""
    experts, d_out, d_in = s.shape
    return ModuleRecord(
        name=s.name, type=type_, layer=layer_index(s.name), d_out=d_out, d_in=d_in, nfn=s.nfn, nfn_std=s.nfn_std,
        token_count=s.tokens, calls=s.calls, baseline=float(s.baseline.mean()), input_norm_mean=s.input_norm_mean,
        input_norm_max=s.input_norm_max, output_norm_mean=s.output_norm_mean, experts=experts,
        expert_nfn=[None if math.isnan(v) else float(v) for v in s.expert_nfn],
    )


def _eligible(records: Sequence[ModuleRecord], layout: ModelLayout, exclude: Sequence[str]) -> list[ModuleRecord]:
    """The records a recommendation may choose: not of a type PEFT refuses on this model, nor a
    type or module the user excluded."""
    return [m for m in records if m.type not in layout.refused and not {m.type, m.name} & set(exclude)]


def _replicates(state: GlobalState, records: Sequence[ModuleRecord]) -> np.ndarray:
    stats = {**state.stats, **state.experts}
    return np.stack([stats[m.name].bootstrap_nfn() for m in records])


def _samples_to_stable(checkpoints: list[Checkpoint]) -> int | None:
    """Samples seen at the first checkpoint after which the selection never changed."""
    if not checkpoints:
        return None
    final = checkpoints[-1][1]
    first = len(checkpoints) - 1
    while first > 0 and checkpoints[first - 1][1] == final:
        first -= 1
    return checkpoints[first][0]


def _progress(total: int | None, enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]diagnosing[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
        TextColumn("{task.fields[tps]:>8.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), disable=not enabled, console=Console(stderr=True),  # stdout may carry --json
    )


def _collect(model: nn.Module, data, tokenizer, config: DiagnoseConfig, total: int | None, progress: bool,
             layout: ModelLayout, device: torch.device):
    """The forward pass, its inputs on ``device``: ``(records, selector, replicates, checkpoints,
    samples, tokens)``."""
    modules = find_linear_modules(model, include_head=config.include_head)
    if not modules:
        raise ModelError(f"{type(model).__name__} has no linear modules (nn.Linear or Conv1D) to diagnose")
    target = model if config.include_head else body(model)
    call_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(target.forward).parameters else {}
    checkpoints: list[Checkpoint] = []
    selector = records = None
    start = time.perf_counter()
    linear, per_expert = sharded.baselines(modules, find_experts(model)) if config.shard else (None, None)
    with ExitStack() as stack:
        collector = stack.enter_context(NFNCollector(modules, estimator=config.estimator, baselines=linear,
                                                     n_bootstrap=config.n_bootstrap, seed=config.seed))
        experts = stack.enter_context(ExpertStats(find_experts(model), config.n_bootstrap, per_expert))
        bar = stack.enter_context(_progress(total, progress))
        task = bar.add_task("diagnose", total=total, tps=0.0)

        def forward(batch: Batch) -> None:
            inputs = model_inputs(model, batch.inputs)  # an encoder-decoder's decoder inputs too
            masks = [v for k, v in inputs.items() if k.endswith("attention_mask")]
            if batch.scored is not None:  # the model reads every token, the statistics take these
                masks = [batch.scored]
            collector.start_batch(*masks, rows=batch.rows)
            experts.start_batch(masks[0], collector.weights)
            target(**{k: v.to(device) for k, v in inputs.items()}, **call_kwargs)
            collector.flush()

        passes = functools.partial(data_parallel_passes, lockstep=config.shard) if world().parallel else _local_passes
        for state, batch in passes(collector, experts.stats, _batches(data, tokenizer, config), forward):
            bar.update(task, advance=len(batch), tps=state.tokens / (time.perf_counter() - start))
            if not batch.closes_window:
                continue  # within a window the rows seen are not a prefix of the sample
            records = _records(state, layout.role_map)
            # rebuilt per window: a module first called late must still be costed and ranked
            selector = Selector(_eligible(records, layout, config.exclude or ()), config.strategy, rank=config.rank)
            checkpoints.append((state.samples, selector(np.array([m.nfn for m in selector.records]))))
            if config.stops(state.samples):
                if selector.recommend(_replicates(state, selector.records))[0].stable:
                    break
        if selector is None:
            raise DataError("no data to diagnose on")
        return (records, selector, _replicates(state, selector.records), checkpoints, state.samples,
                state.tokens)


def _local_passes(collector: NFNCollector, experts: Mapping[str, ExpertWeightStats], batches: Iterable[Batch],
                  forward) -> Iterator[tuple[GlobalState, Batch]]:
    """``(state, batch)`` after each batch, the state being this process's own accumulators: the
    single-process counterpart of :func:`plop.measure.data_parallel.data_parallel_passes`."""
    state = GlobalState(collector.stats, dict(experts))
    for batch in batches:
        forward(batch)
        state.samples, state.tokens = collector.samples, collector.tokens
        yield state, batch


def _examples_data(model: nn.Module, examples: Sequence, tokenizer, config: DiagnoseConfig):
    """Prompt/response examples as a decoder-only model reads them (their texts) or as token
    batches with the response for an encoder-decoder's decoder (:mod:`plop.measure.seq2seq`)."""
    if not is_encoder_decoder(model):
        return list(examples) if config.tokens != "all" else [e.text for e in examples]
    if config.tokens != "all":
        raise ConfigError(f"tokens={config.tokens!r} is for decoder-only models",
                          "an encoder-decoder already reads the prompt in its encoder and the response in its decoder")
    if tokenizer is None:
        raise ConfigError("diagnosing prompt/response examples needs a tokenizer")
    ensure_pad_token(tokenizer)
    return pair_batches(model, examples, tokenizer, config.batch_size, config.max_length)


def _prompted(data) -> list:
    if not _is_examples(data):
        raise ConfigError("generate needs prompts to complete", "give prompt/response examples, not plain texts")
    return data


def _prepared(model: nn.Module, data, tokenizer, config: DiagnoseConfig):
    """``(data, total rows or None, advantages or None)``: texts and examples cut to ``samples`` and
    clipped, examples turned into what the model reads; token batches as they come (their rows are
    counted later). With a ``reward``, the GRPO advantage of each generated completion."""
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and len(data) == 0:
        raise DataError("no data to diagnose on")
    total = advantages = None
    examples = _is_examples(data)
    if _is_texts(data) or examples:
        data = take_sample(data, config.samples, config.seed)
        if config.generate:  # the sampled prompts, each with K completions of the model's own
            reward = load_reward(config.reward) if config.reward else None  # before the slow generation
            sampled = _prompted(data)
            data = generated_examples(model, sampled, tokenizer, k=config.generate,
                                      max_new_tokens=config.max_new_tokens, max_length=config.max_length,
                                      seed=config.seed)
            if reward is not None:
                advantages = _advantages(reward, sampled, data, tokenizer, config.generate)
        total = len(data)
    if config.tokens != "all" and not examples:
        raise ConfigError(f"tokens={config.tokens!r} needs prompt/response examples",
                          "give data with a prompt and a response (or score all tokens)")
    if examples:
        data = _examples_data(model, data, tokenizer, config)
    if _is_texts(data):
        # cut to what max_length tokens can cover before tokenizing: memory stays bounded by the
        # token budget, not by the longest line in the data
        data = [clip_text(text, config.max_length) for text in data]
    return data, total, advantages


def _advantages(reward, sampled: Sequence, generated: Sequence, tokenizer, k: int) -> np.ndarray:
    """GRPO's advantage of each generated completion (``k`` per sampled prompt, in order), from
    ``reward`` called as TRL's GRPO trainer calls it. A None reward counts 0, as TRL's sum over
    reward functions (``nansum``) makes it."""
    completions = [g.response for g in generated]
    values = reward(prompts=[e.prompt for e in sampled for _ in range(k)], completions=completions,
                    completion_ids=tokenizer(completions, add_special_tokens=False)["input_ids"],
                    response=[e.response for e in sampled for _ in range(k)], trainer_state=None,
                    log_extra=None, log_metric=None)
    return group_advantages(np.array([0.0 if v is None else v for v in values]), k)


def _dataset_rows(model: nn.Module, data, tokenizer, config: DiagnoseConfig, data_info: Mapping[str, Any] | None):
    """``(data, tokenizer, data_info)``: a dataset in TRL's formats becomes sampled examples, the way
    plop reads its own data (the model's own tokenizer when none is given); other data passes."""
    if not is_dataset(data):
        return data, tokenizer, data_info
    tokenizer = tokenizer if tokenizer is not None else model_tokenizer(model)
    data, info = dataset_examples(data, tokenizer, samples=config.samples, seed=config.seed, tokens=config.tokens)
    return data, tokenizer, {**info, **(data_info or {})}


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
    ``z_t`` (see :mod:`plop.measure.nfn`), ranks module types by mean NFN over layers and recommends the
    lowest ones; ``signal`` may rank them by LoRA-B gradient signs instead (:mod:`plop.measure.grad_sign`).

    Args:
        model: a transformers model (or any ``nn.Module`` taking ``input_ids``/``attention_mask``).
        data: texts (tokenized here with ``tokenizer``), prompt/response examples (``.prompt``,
            ``.response``; an encoder-decoder's decoder is fed the response), a dataset in one of
            TRL's formats (:mod:`plop.files.trl_formats`; ``samples`` rows drawn with ``seed``;
            no ``tokenizer``: the model's own, from its ``name_or_path``), or an iterable of
            token batches (``decoder_input_ids`` optional: an encoder-decoder without them decodes
            its shifted input).
        config: a :class:`DiagnoseConfig`; ``overrides`` replace its fields (``strategy="allocate", top_k=2``).
        model_id, data_info: recorded in the report (``data_info`` merges into ``report.data``).
        progress: show a progress bar with tokens/s and ETA.

    Inside an initialised ``torch.distributed`` process group of several processes the
    diagnosis is data-parallel (see :mod:`plop.measure.data_parallel`): each process runs its share of
    the batches, and every process returns the report one process would have made of all the
    data; only rank 0 shows progress. ``shard=True`` there also splits the weights across the
    processes (FSDP2, see :mod:`plop.model.sharding`; an unsharded ``model`` is sharded in place).
    """
    config = (config or DiagnoseConfig()).with_overrides(**overrides)
    if config.shard:  # FSDP2, 1/N of the weights per process; shards the model in place unless it is
        sharding.prepare(model, config.include_head)
    device = _input_device(model)
    config = replace(config, batch_tokens=_batch_tokens(model, config, device))  # recorded as used
    data, tokenizer, data_info = _dataset_rows(model, data, tokenizer, config, data_info)
    data, total, advantages = _prepared(model, data, tokenizer, config)
    layout = model_layout(model)
    progress = progress and world().is_main  # one bar for a data-parallel diagnosis
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        records, selector, replicates, checkpoints, samples, tokens = _measure(
            model, data, tokenizer, config, total, progress, layout, device, advantages)
    finally:
        model.train(was_training)
    if config.weight_scores:
        _add_weight_scores(records, find_linear_modules(model, include_head=config.include_head))
    return _report(model, layout, config, records, selector, replicates, checkpoints, model_id=model_id,
                   data={"source": "in-memory", **(data_info or {}), "samples": samples, "token_count": tokens,
                         **({"generated": generation_record(model, config.generate, config.max_new_tokens,
                                                            config.seed)} if config.generate else {}),
                         "seconds": round(time.perf_counter() - start, 3)})


def _measure(model: nn.Module, data, tokenizer, config: DiagnoseConfig, total: int | None, progress: bool,
             layout: ModelLayout, device: torch.device, advantages: np.ndarray | None = None):
    """:func:`_collect`'s NFN pass, its selection replaced by the grad-sign signal's when that is asked for."""
    records, selector, replicates, checkpoints, samples, tokens = _collect(
        model, data, tokenizer, config, total, progress, layout, device)
    if config.signal != "nfn":
        selector, replicates, checkpoints = _grad_sign(model, data, tokenizer, config, records, layout, device,
                                                       advantages)
    return records, selector, replicates, checkpoints, samples, tokens


def _grad_sign(model: nn.Module, data, tokenizer, config: DiagnoseConfig, records: Sequence[ModuleRecord],
               layout: ModelLayout, device: torch.device, advantages: np.ndarray | None
               ) -> tuple[Selector, None, list[Checkpoint]]:
    """Score the records by the sign consistency of LoRA-B gradients on the first ``grad_batches``
    batches (:mod:`plop.measure.grad_sign`; GRPO's loss when there are ``advantages``) and select by
    ``config.signal`` among the scored ones.
    The scores have no bootstrap and no checkpoints: the recommendation's stability goes unmeasured."""
    if world().parallel:
        raise ConfigError(f"signal {config.signal!r} runs in one process", "run it without torchrun")
    if is_encoder_decoder(model):
        raise ConfigError(f"signal {config.signal!r} is for decoder-only models (a causal-LM loss)")
    modules = find_linear_modules(model, include_head=config.include_head)
    scores = grad_sign_scores(model, modules, _batches(data, tokenizer, config), config.grad_batches, config.seed,
                              device, advantages)
    for m in records:
        m.grad_sign = scores.get(m.name)
    eligible = {m.name for m in _eligible(records, layout, config.exclude or ()) if m.grad_sign is not None}
    keep = [i for i, m in enumerate(records) if m.name in eligible]
    # the values over all records, as the report's type ranking takes them, so the two agree
    values = signal_values(records, config.signal, config.signal_weight)[keep]
    return Selector([records[i] for i in keep], config.strategy, rank=config.rank, values=values), None, []


def _add_weight_scores(records: Sequence[ModuleRecord], modules: Mapping[str, nn.Module]) -> None:
    for m in records:
        if m.name in modules:  # linear modules; 3-D expert weights are not scored
            kappa, m.snr = weight_scores(dense_weight(modules[m.name]))
            m.kappa = kappa if math.isfinite(kappa) else None  # a singular matrix: no finite condition number


def _report(model, layout: ModelLayout, config: DiagnoseConfig, records, selector: Selector, replicates,
            checkpoints, *, model_id: str | None, data: dict[str, Any]) -> Report:
    types = rank_types(records, signal_values(records, config.signal, config.signal_weight))
    recommendation, probabilities = selector.recommend(replicates)
    recommendation.samples_to_stable = _samples_to_stable(checkpoints)
    recommendation_targets(recommendation, layout)
    refused = {t.type: layout.refused[t.type] for t in types if t.type in layout.refused}
    for t, why in refused.items():  # the user's own exclusions need no warning
        warnings.warn(f"{t} is left out of the recommendation: {why}", stacklevel=3)
    recommendation.excluded = {**refused, **{x: "excluded by the user" for x in config.exclude or ()}} or None
    for t in types:
        t.selection_probability = None if probabilities is None else probabilities.get(t.type)
    return Report(
        model=model_info(model, model_id),
        data=data,
        settings=asdict(config),
        modules=records,
        types=types,
        recommendation=recommendation,
        costs=placement_costs(records, config.rank, recommendation),
        data_free=data_free_choices(records, len(recommendation.types)) if config.weight_scores else None,
        stability={
            "n_bootstrap": config.n_bootstrap,
            "agreement": recommendation.agreement,
            "stable": recommendation.stable,
            "threshold": STABLE_AGREEMENT,
            "samples_to_stable": recommendation.samples_to_stable,
            # per-layer selections are module lists; the type-level history is what reads well
            "checkpoints": [] if config.strategy.kind == "per_layer" else [[n, sorted(s)] for n, s in checkpoints],
        },
        coverage=coverage(model, [m.name for m in records], layout.params),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
