"""What to adapt, and how: the two records every package passes around, and the one function that
turns them into PEFT's ``LoraConfig``.

* :class:`Placement`: which modules get LoRA (``target_modules``, the 3-D expert weights of
  ``target_parameters``, layer and module exclusions), at which rank each (``rank_pattern``), and
  the name of what it is (``recommended``, ``all-linear``, ``custom``...). A report's
  recommendation *is* a placement; a config read from any stack becomes one.
* :class:`LoraSettings`: the LoRA hyper-parameters (rank, alpha, dropout, DoRA, rsLoRA, the LoRA+
  ratio), the same for every placement of a comparison.

Torch-free: ``peft`` is imported only when :func:`lora_config` builds a config object, so a
stack's file is written and read back without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .config import default_alpha, option
from .errors import ConfigError


_LORA = "fine-tuning"


@dataclass(frozen=True)
class LoraSettings:
    """How each adapter is built and trained. ``alpha`` None means :func:`plop.config.default_alpha`
    of whatever the rank is, so ``replace(settings, r=8)`` keeps that rule; ``loraplus_ratio`` None or 1
    is plain LoRA (LoRA+ is an optimizer setting: B's learning rate over A's). Each field carries its
    command-line option (``--rank``, ``--alpha``, ``--dropout``, ``--dora``, ``--rslora``,
    ``--loraplus-ratio``): ``plop train``, ``compare`` and ``export`` all read them from here."""

    r: int = option(16, "LoRA rank", flag="--rank", metavar="RANK", parse="positive", group=_LORA)
    alpha: float | None = option(None, "lora_alpha (default: 2 x rank)", group=_LORA)
    dropout: float = option(0.05, "LoRA dropout", group=_LORA)
    use_dora: bool = option(False, "DoRA: also learn each output's magnitude", flag="--dora", group=_LORA)
    use_rslora: bool = option(False, "rsLoRA: scale the adapters by alpha / sqrt(rank) instead of alpha / rank",
                              flag="--rslora", group=_LORA)
    loraplus_ratio: float | None = option(None, "LoRA+: the B matrices' learning rate over the A matrices' "
                                                "(1: plain LoRA)", group=_LORA)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"rank must be an integer >= 1, got {self.r!r}")
        checks = [
            (self.alpha is None or self.alpha > 0, f"alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.loraplus_ratio is None or self.loraplus_ratio >= 1,
             f"loraplus_ratio must be >= 1 (1 is plain LoRA), got {self.loraplus_ratio}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def lora_alpha(self) -> float:
        """The ``lora_alpha`` in force: ``alpha``, else the default for ``r``."""
        return default_alpha(self.r) if self.alpha is None else self.alpha

    @property
    def loraplus(self) -> bool:
        return self.loraplus_ratio is not None and self.loraplus_ratio != 1


@dataclass(kw_only=True)
class Placement:
    """Where the adapters go, in PEFT's terms (PEFT's matching rule: :func:`plop.model.roles.peft_matches`).

    ``target_modules`` is a suffix list or a full-match regex; ``types`` are the module types it
    covers; ``rank_pattern`` gives some keys their own rank, and ``alpha_pattern`` their own alpha
    (None: each keeps ``alpha / rank`` at the settings' ``lora_alpha / r``).
    """

    name: str = "custom"
    target_modules: list[str] | str = field(default_factory=list)
    target_parameters: list[str] | None = None  # 3-D expert weights (LoraConfig(target_parameters=...))
    types: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None

    @property
    def is_regex(self) -> bool:
        return isinstance(self.target_modules, str)


def lora_kwargs(placement: Placement, settings: LoraSettings, **extra: Any) -> dict[str, Any]:
    """``peft.LoraConfig`` keyword arguments, as asked (``plop check`` builds a user's config with
    them), without importing PEFT; ``extra`` adds others (``task_type``, ``modules_to_save``...).
    Keys left at PEFT's default (None) are not written."""
    alpha_pattern = placement.alpha_pattern
    if placement.rank_pattern and alpha_pattern is None:  # each key's alpha / rank as the settings'
        alpha_pattern = {k: rank * settings.lora_alpha / settings.r for k, rank in placement.rank_pattern.items()}
    kwargs = {
        "r": settings.r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.dropout,
        "use_dora": settings.use_dora, "use_rslora": settings.use_rslora,
        "target_modules": placement.target_modules, "target_parameters": placement.target_parameters,
        "rank_pattern": placement.rank_pattern, "alpha_pattern": alpha_pattern,
        "exclude_modules": placement.exclude_modules, "layers_to_transform": placement.layers_to_transform,
        "layers_pattern": placement.layers_pattern, **extra,
    }
    return {k: v for k, v in kwargs.items() if v is not None}


def adapter_dropout(placement: Placement, settings: LoraSettings) -> float:
    """The LoRA dropout PEFT takes on ``placement``: 0 where it adapts 3-D expert weights
    (``target_parameters``: PEFT's ParamWrapper refuses any other, peft/tuners/lora/layer.py), else
    the setting's. Every stack that hands expert weights to PEFT follows this one rule."""
    return 0.0 if placement.target_parameters else settings.dropout


def fitted(placement: Placement, settings: LoraSettings) -> LoraSettings:
    """``settings`` as PEFT takes them on ``placement``: the :func:`adapter_dropout`, and no DoRA on
    3-D expert weights, which is refused here with a ConfigError rather than deep inside PEFT."""
    if not placement.target_parameters:
        return settings
    if settings.use_dora:
        raise ConfigError("DoRA cannot adapt MoE expert weights (PEFT target_parameters)",
                          "train without --dora, or choose targets without the experts")
    return replace(settings, dropout=adapter_dropout(placement, settings))


def lora_config(placement: Placement, settings: LoraSettings, **extra: Any):
    """The ``peft.LoraConfig`` plop trains or recommends: :func:`lora_kwargs` of the
    :func:`fitted` settings."""
    from peft import LoraConfig

    return LoraConfig(**lora_kwargs(placement, fitted(placement, settings), **extra))
