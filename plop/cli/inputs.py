"""What the commands that load a model share: the model and data options, and loading them in the
order that fails fast (the data is read and checked before the slow model load)."""

from __future__ import annotations

import argparse

from ..config import DiagnoseConfig, ModelConfig
from ..files.data import DataSource, TaskRows, TextFormat
from .options import Options, build, command

BIG_MODELS = ("max_memory", "offload_dir", "shard")  # the loading options of plop diagnose alone


def model_command(sub, name: str, help: str, description: str, epilog: str, *, train_config: type | None = None,
                  train_skip: tuple[str, ...] = (), train_defaults: dict | None = None,
                  big_models: bool = False) -> Options:
    """A subcommand that loads a model and reads data: the model and data options (``train_config``
    adds a fine-tune's, less ``train_skip``, with this command's ``train_defaults``; ``big_models``
    the offload options), examples in --help.
    The command adds its own options through the returned :class:`Options`."""
    options = Options(command(sub, name, help, description, epilog))
    options.add(ModelConfig, skip=() if big_models else BIG_MODELS)
    options.add(DataSource, TextFormat)
    if train_config is None:
        options.add(DiagnoseConfig, only=("samples", "max_length", "batch_size", "seed"))
    else:  # a fine-tune reads all the rows unless told otherwise
        options.add(DiagnoseConfig, only=("samples",), defaults={"samples": None},
                    helps={"samples": "rows to sample (default: all)"})
        options.add(train_config, skip=train_skip, defaults=train_defaults)
    return options


def read_data(args: argparse.Namespace, samples: int | None, warn_short: bool = True) -> TaskRows:
    """The data file read, its rows sampled and its fields checked, before any model is loaded;
    ``warn_short``: say so when the file has fewer rows than ``samples``."""
    from ..files.data import read_rows

    source = build(DataSource, args)
    return read_rows(source.data, samples=samples, seed=args.seed, text_format=build(TextFormat, args),
                     split=source.split, config=source.data_config, warn_short=warn_short)


def load_model_and_data(args: argparse.Namespace, samples: int | None, warn_short: bool = True):
    """``(model, tokenizer, model_id, examples, info)`` on every process of a launched job (the seeded
    sampling gives all of them the same rows); ``samples`` and ``warn_short`` as :func:`read_data`."""
    model_config = build(ModelConfig, args)  # loading options that do not combine fail here
    rows = read_data(args, samples, warn_short)  # then the data: a bad file fails before torch is even imported
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from ..utils.distributed import init_from_env
    from ..model.loading import load_model

    hf_logging.disable_progress_bar()  # the spinner says it once, instead of three bars per load
    try:
        status = "loading model (a .gguf file is converted once, then cached)"
        with Console(stderr=True, quiet=not init_from_env().is_main).status(status):
            model, tokenizer, model_id = load_model(
                model_config.model, dtype=model_config.dtype, device=model_config.device,
                trust_remote_code=model_config.trust_remote_code, max_memory=model_config.max_memory,
                offload_dir=model_config.offload_dir, quantize=model_config.quantize, shard=model_config.shard)
    finally:
        hf_logging.enable_progress_bar()
    examples, info = rows.examples(tokenizer)
    return model, tokenizer, model_id, examples, info


def is_main() -> bool:
    """Whether this process writes and prints: rank 0 of a launched job, or the only process."""
    from ..utils.distributed import world

    return world().is_main
