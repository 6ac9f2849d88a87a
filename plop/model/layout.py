"""What placing adapters needs to know of a model (:class:`ModelLayout`), read off a loaded model by
:func:`plop.model.loading.model_layout`; torch-free, it works on module names and shapes."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import PlopError
from ..placement import Placement
from .roles import peft_matches, peft_target_parameters, peft_targets, role_types


@dataclass(frozen=True)
class ModelLayout:
    """What placing adapters needs to know of a model: its architecture, its linear modules
    (``name -> (d_out, d_in)``, the output head included), the head's name, its 3-D expert
    weights (``name -> (experts, d_out, d_in)``, PEFT ``target_parameters``), every module name
    (PEFT wraps convolutions too, so exact targets must miss them) and the types PEFT refuses on
    this model (type -> why, see :mod:`plop.model.peft_rules`)."""

    architecture: str
    linear: Mapping[str, tuple[int, int]]
    head: str | None = None
    params: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)
    modules: tuple[str, ...] = ()
    refused: Mapping[str, str] = field(default_factory=dict)

    @property
    def body(self) -> list[str]:
        """Linear module names and expert weights without the output head: what placements choose from."""
        return [n for n in [*self.linear, *self.params] if n != self.head]

    @cached_property
    def role_map(self) -> dict[str, str]:
        """Every linear module's and expert weight's role-true type (:func:`plop.model.roles.role_types`)."""
        return role_types([*self.linear, *self.params], params=self.params)

    def types_of(self, names: Collection[str]) -> list[str]:
        return sorted({self.role_map[n] for n in names})

    def peft_targets(self, types: Collection[str]) -> tuple[list[str] | str, list[str] | None]:
        """``(target_modules, target_parameters)`` that PEFT matches to exactly the modules and
        expert weights of ``types``; ``target_modules`` is ``[]`` when only expert weights are chosen."""
        params = {n: t for n, t in self.role_map.items() if n in self.params}
        modules = {n: t for n, t in self.role_map.items() if n not in self.params}
        chosen_params = [t for t in types if t in set(params.values())]
        chosen_modules = [t for t in types if t not in chosen_params]
        target_modules = peft_targets(chosen_modules, modules, self.modules) if chosen_modules else []
        if isinstance(target_modules, list):  # the types themselves: keep their order (ascending NFN)
            target_modules = sorted(target_modules, key=chosen_modules.index)
        return target_modules, peft_target_parameters(chosen_params, params) if chosen_params else None

    def placement(self, name: str, types: list[str]) -> Placement:
        """The placement ``name`` of ``types``, with its exact PEFT targets."""
        target_modules, target_parameters = self.peft_targets(types)
        return Placement(name=name, target_modules=target_modules, types=types, target_parameters=target_parameters)


def modules_peft_adapts(layout: ModelLayout, target_modules: Sequence[str] | str) -> list[str]:
    """The linear modules PEFT would adapt (:func:`plop.model.roles.peft_matches`)."""
    matched = [n for n in layout.linear if peft_matches(n, target_modules)]
    if not matched:
        raise PlopError(f"target modules {target_modules!r} match no linear module of this model",
                        f"its module types: {', '.join(layout.types_of(layout.body))}")
    return matched
