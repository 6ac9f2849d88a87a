"""Role-true module types, and PEFT targets that hit exactly the chosen ones (no torch needed).

A module's *role* is its name with the indices of repeated blocks (layers, experts, T5 sublayers)
wildcarded: ``model.layers.3.self_attn.q_proj`` and ``model.layers.7.self_attn.q_proj`` share the
role ``model.layers.*.self_attn.q_proj``. A role's *type* is the shortest suffix of its role that
tells it apart from every other role's type:

    LLaMA      q_proj, v_proj, up_proj, ...                      (the last component suffices)
    BERT       attention.output.dense, intermediate.dense, output.dense, query, key, value
    BART       encoder.layers.*.self_attn.q_proj, decoder.layers.*.self_attn.q_proj,
               encoder_attn.q_proj (cross-attention)
    T5         encoder.block.*.layer.*.SelfAttention.q, decoder.block.*.layer.*.SelfAttention.q,
               EncDecAttention.q

Suffixes grow first inside the block (after the last index), and reach past it only when two
roles have the same in-block name: the encoder's and the decoder's self-attention, or a vision
tower's and a language model's ``q_proj``.

PEFT matches a ``target_modules`` list entry ``k`` against a module name ``n`` when ``n == k`` or
``n.endswith("." + k)``, and a string by ``re.fullmatch``. A list of types is therefore exact only
when no other role ends with a chosen type (BERT: ``output.dense`` also ends
``attention.output.dense``); :func:`peft_targets` falls back to a regex over the roles then.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence

INDEX = "*"
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_TOKEN_MIXER = re.compile(r"^(mixer|mamba|ssm|linear_attn)$", re.IGNORECASE)  # state-space blocks: neither
# queries and values; DeepSeek's MLA makes them in q_b_proj / kv_b_proj; the rest are fused q/k/v
_QV = {"q_proj", "v_proj", "q", "v", "query", "value", "query_proj", "value_proj", "q_b_proj", "kv_b_proj",
       "c_attn", "query_key_value", "Wqkv", "qkv_proj", "qkv", "in_proj"}


def role(name: str) -> str:
    """``name`` with every numeric component but the last replaced by ``*``.

    A numeric last component is a position in a ``Sequential`` (``merger.mlp.0`` vs
    ``merger.mlp.2``), a role of its own rather than a repeat.
    """
    parts = name.split(".")
    return ".".join([INDEX if p.isdigit() else p for p in parts[:-1]] + parts[-1:])


def _in_block(parts: list[str]) -> int:
    """How many trailing components lie below the last index (all of them when none)."""
    return parts[::-1].index(INDEX) if INDEX in parts else len(parts)


def role_types(names: Iterable[str], *, params: Collection[str] = ()) -> dict[str, str]:
    """Every name's type: the shortest role suffix unique to its role.

    Colliding roles lengthen their suffix one component at a time, those with room left inside
    their block first; a suffix never starts at an index. ``params`` are names of parameters
    (``mlp.experts.gate_up_proj``) rather than modules: their type always names the owning module
    too (``experts.gate_up_proj``), and so does a ``Sequential`` position (``mlp.0``).
    """
    names = list(names)
    roles = sorted({role(n) for n in names})
    parts = {r: r.split(".") for r in roles}
    params_roles = {role(p) for p in params}
    # a bare parameter name or Sequential position ("0") says nothing: start with its parent
    length = {r: min(2 if r in params_roles or parts[r][-1].isdigit() else 1, len(parts[r])) for r in roles}

    def suffix(r: str) -> str:
        return ".".join(parts[r][-length[r]:])

    while True:
        groups: dict[str, list[str]] = defaultdict(list)
        for r in roles:
            groups[suffix(r)].append(r)
        collisions = [g for g in groups.values() if len(g) > 1]
        if not collisions:
            break
        for group in collisions:
            inside = [r for r in group if length[r] < _in_block(parts[r])]
            grow = inside or [r for r in group if length[r] < len(parts[r])]
            if not grow:  # one role's full name is a suffix of another's; the latter grows
                continue
            for r in grow:
                length[r] += 1
                while parts[r][-length[r]] == INDEX:
                    length[r] += 1
    return {n: suffix(role(n)) for n in names}


def _layer_of(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index PEFT reads off ``name`` for ``layers_to_transform``: the first numbered
    segment (not a nested expert index), or the one after ``layers_pattern``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or ())
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    match = next((m for m in (re.match(r, name) for r in regexes) if m), None)
    return int(match["idx"]) if match else None


def peft_matches(name: str, target: str | Iterable[str], *, layers_to_transform: int | Sequence[int] | None = None,
                 layers_pattern: str | Sequence[str] | None = None,
                 exclude_modules: str | Iterable[str] | None = None) -> bool:
    """PEFT's rule for ``target_modules`` (``peft.tuners.tuners_utils.check_target_module_exists``):
    a str is a regex that must full-match the module name, a list holds names matched whole or as a
    suffix at a ``.`` boundary. ``exclude_modules`` (the same two forms) wins over the target, and
    ``layers_to_transform`` / ``layers_pattern`` narrow a *list* target to blocks by index.

    plop's one copy of it, tested equal to PEFT's own on every module name of the architecture
    sweep, so exports, their read-back and placements resolve targets without importing PEFT (and
    torch)."""
    if exclude_modules and (re.fullmatch(exclude_modules, name) if isinstance(exclude_modules, str)
                            else any(name == e or name.endswith("." + e) for e in exclude_modules)):
        return False
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    if not any(name == t or name.endswith("." + t) for t in target):
        return False
    if layers_to_transform is None or layers_to_transform == []:
        return True
    index = _layer_of(name, layers_pattern)
    if index is None:
        return False
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def _suffix_list(chosen: Collection[str], role_map: Mapping[str, str], others: Iterable[str]) -> list[str] | None:
    """The chosen types as a PEFT list, or None where that list would match other names too."""
    keys = sorted(set(chosen))
    if any(INDEX in k for k in keys):
        return None
    wanted = {n for n, t in role_map.items() if t in chosen}
    hit = {n for n in {*role_map, *others} if peft_matches(n, keys)}
    return keys if hit == wanted else None


def roles_regex(names: Iterable[str]) -> str:
    """A regex that ``re.fullmatch`` accepts on exactly the names sharing a role with ``names``."""
    patterns = sorted({re.escape(role(n)).replace(re.escape(INDEX), r"\d+") for n in names})
    return patterns[0] if len(patterns) == 1 else "(?:" + "|".join(patterns) + ")"


def peft_targets(chosen: Collection[str], role_map: Mapping[str, str], others: Iterable[str] = ()) -> list[str] | str:
    """A ``target_modules`` value that PEFT matches to exactly the modules of the ``chosen``
    types in ``role_map`` (module name -> type): the types themselves where that list is exact,
    else a full-match regex over the chosen roles.

    ``others``: the model's other module names. PEFT wraps convolutions and embeddings too, so a
    list is only exact if it misses those as well (Qwen2-VL's ``patch_embed.proj`` is a Conv3d).
    """
    unknown = set(chosen) - set(role_map.values())
    if unknown:
        raise ValueError(f"unknown module types: {', '.join(sorted(unknown))}")
    keys = _suffix_list(chosen, role_map, others)
    if keys is not None:
        return keys
    return roles_regex(n for n, t in role_map.items() if t in chosen)


def peft_target_parameters(chosen: Collection[str], role_map: Mapping[str, str]) -> list[str]:
    """``target_parameters`` for the ``chosen`` parameter types in ``role_map`` (parameter name
    -> type). PEFT matches these lists like ``target_modules`` lists but takes no regex, so where
    the types are not exact the full parameter names are listed."""
    keys = _suffix_list(chosen, role_map, ())
    return keys if keys is not None else sorted(n for n, t in role_map.items() if t in chosen)


def _family(role_name: str) -> str | None:
    """``attention``, ``mlp`` or None (outside the blocks, or a state-space token mixer)."""
    parts = role_name.split(".")
    if INDEX not in parts:
        return None  # pooler, projector, heads: not part of a repeated block
    local = parts[len(parts) - _in_block(parts):]
    if any(_TOKEN_MIXER.match(p) for p in local):
        return None
    return "attention" if any(_ATTENTION.search(p) for p in local) else "mlp"


def placement_groups(types: Mapping[str, str]) -> dict[str, list[str]]:
    """The usual placements as type lists, read off the roles rather than guessed from names,
    for ``types`` (name -> role-true type, as :func:`role_types` gives).

    Inside a repeated block, a module under an ``attn``/``attention`` component is attention
    (BERT's ``attention.output.dense`` and cross-attention included) and everything else is the
    feed-forward ("mlp": BERT's ``intermediate.dense`` and ``output.dense``, T5's
    ``DenseReluDense``, MoE experts and routers). State-space mixers (``mixer``, ``mamba``) and
    modules outside the blocks are in ``all-linear`` only. ``qv`` is the attention queries and
    values, or the fused projection that holds them.
    """
    by_family: dict[str | None, set[str]] = defaultdict(set)
    for n, t in types.items():
        by_family[_family(role(n))].add(t)
    attention = by_family["attention"]
    qv = {t for t in attention if t.rsplit(".", 1)[-1] in _QV}
    return {"qv": sorted(qv), "attention": sorted(attention), "mlp": sorted(by_family["mlp"]),
            "all-linear": sorted(set(types.values()))}


def placement_roles(names: Sequence[str], *, params: Collection[str] = ()) -> dict[str, list[str]]:
    """:func:`placement_groups` of the role-true types of ``names``."""
    return placement_groups(role_types(names, params=params))
