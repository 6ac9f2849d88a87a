"""The architecture holds: imports only point down, the diagnosis never reaches the fine-tuning,
no function grows past a screen, and the commands that only read a report start without torch."""

from __future__ import annotations

import ast
import io
import re
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "plop"
# the diagnosis side: what a user who never fine-tunes runs
DIAGNOSIS = {"plop.config", "plop.diagnosis", "plop.errors", "plop.version", "plop.files.data", "plop.utils.fsio",
             "plop.utils.untrusted", "plop.utils.distributed", "plop.measure.batching", "plop.measure.collector", "plop.measure.data_parallel",
             "plop.measure.experts", "plop.measure.grad_sign", "plop.model.layers", "plop.measure.nfn", "plop.measure.seq2seq",
             "plop.measure.sharded", "plop.measure.weight_scores", "plop.model.coverage", "plop.model.loading", "plop.model.names",
             "plop.model.peft_rules", "plop.model.layout", "plop.model.roles", "plop.ranking.ranker",
             "plop.model.experts", "plop.model.sharding", "plop.ranking.placements",
             "plop.ranking.render", "plop.ranking.report", "plop.files.trl_formats", "plop.files.reward"}
# the stages, bottom up: a module imports only from its own stage or the stages below it; utils, the
# floor every stage stands on, imports nothing of plop's but the errors
FLOORS = [("plop.errors", "plop.version"), ("plop.utils",), ("plop.config",), ("plop.placement",), ("plop.files",),
          ("plop.model",), ("plop.measure",), ("plop.ranking",), ("plop.stacks",), ("plop.audit",), ("plop.diagnosis",),
          ("plop.finetune",), ("plop.integrations",), ("plop.cli",),
          ("plop.__main__",)]
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every plop module ``path`` imports: at the top, inside functions, or for type checkers only."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("plop")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("plop"):
                # "from . import x" names a module when x is one
                found |= {f"{base}.{a.name}" if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(
                    ".py").exists() else base for a in node.names}
    return found - {module}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycle_lazy_or_type_only():
    graph = _graph()
    assert "plop.diagnosis" in graph and "plop.finetune.trainer" in graph
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == "plop":  # the package's lazy top level is no module below anything
                continue
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _floor(module: str) -> tuple[int, str]:
    """``(floor, stage)``: the stage a module belongs to and its height in :data:`FLOORS`."""
    for height, stages in enumerate(FLOORS):
        for stage in stages:
            if module == stage or module.startswith(stage + "."):
                return height, stage
    raise AssertionError(f"{module} belongs to no stage: add it to FLOORS or move it into one")


def test_stages_import_only_their_own_or_lower_stages():
    upward = []
    for module, imports in _graph().items():
        if module == "plop":  # the lazy top level re-exports from every stage
            continue
        height, stage = _floor(module)
        for imported in imports - {"plop"}:
            other_height, other_stage = _floor(imported)
            if other_height > height or (other_height == height and other_stage != stage and height > 0):
                upward.append(f"{module} -> {imported}")
    assert not upward


def test_top_level_holds_only_the_public_face_and_the_stages():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == {"__init__", "__main__", "errors", "config", "placement", "version", "diagnosis"}
    assert packages == {"utils", "files", "ranking", "measure", "model", "stacks", "audit", "finetune", "integrations", "cli"}
    for package in packages:  # each says its job in two lines
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc and len(doc.split("\n\n")[0].splitlines()) <= 2, package


def test_the_diagnosis_never_imports_finetune():
    graph = _graph()
    assert DIAGNOSIS <= set(graph)
    for module in DIAGNOSIS:
        assert not {m for m in graph[module] if m.startswith("plop.finetune")}, module


def test_no_module_imports_the_lazy_top_level():
    # a submodule importing "plop" itself would run the lazy exports and re-create the old cycle
    for module, imports in _graph().items():
        assert "plop" not in imports or module == "plop", module


def test_functions_fit_on_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert not long


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)


@pytest.mark.spawns
def test_reading_and_exporting_commands_import_no_torch(tmp_path):
    """``plop export`` to every stack (its read-back included), ``show``, ``diff`` and the help pages
    start in a fraction of a second: none imports torch, PEFT, transformers or bitsandbytes. One
    child runs them all in order and names the first command that pulled one in."""
    from conftest import make_batches, make_llama
    from plop import diagnose
    from plop.stacks import FORMATS

    report, other = tmp_path / "report.json", tmp_path / "other.json"
    diagnose(make_llama(), make_batches(8, 8), n_bootstrap=10, top_k=2).save(report)
    diagnose(make_llama(seed=5), make_batches(8, 8), n_bootstrap=10, strategy="per_layer").save(other)
    commands = [["--help"], ["show", str(report)], ["diff", str(report), str(other)], ["train", "--help"],
                ["export", "--help"], *(["export", str(r), "--to", fmt, "--out", str(tmp_path / f"{fmt}-{r.stem}")]
                                        for fmt in FORMATS for r in (report, other))]
    code = ("import contextlib, io, sys\nfrom plop.cli import main\n"
            f"for argv in {commands!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            code = main(argv)\n        except SystemExit as e:\n            code = e.code\n"
            "    heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
            "    print('RESULT', argv[:4], code, heavy)\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == len(commands)
    assert all(line.endswith(" 0 []") for line in lines), lines


@pytest.mark.spawns
def test_diagnosing_a_plain_transformer_imports_no_peft_nor_datasets(tmp_path):
    """PEFT (and the bitsandbytes it pulls in) costs seconds at start-up; its placement rules only
    bear on MoE and state-space models, and JSONL data needs no ``datasets``."""
    from tiny_lm import save_tiny, write_jsonl

    model, data = save_tiny(tmp_path / "model"), write_jsonl(tmp_path / "d.jsonl", 16)
    code = ("import sys\nfrom plop.cli import main\n"
            f"code = main(['diagnose', {str(model)!r}, '--data', {str(data)!r}, '--out', {str(tmp_path / 'r.json')!r}])\n"
            "print('\\nRESULT', code, sorted(m for m in ('peft', 'datasets', 'bitsandbytes', 'pandas', "
            "'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().splitlines()[-1] == "RESULT 0 []"
    assert (tmp_path / "r.json").is_file()


@pytest.mark.spawns
def test_top_level_is_lazy_and_exports_the_api_and_every_error():
    result = _run("import sys, plop\nloaded = 'torch' in sys.modules\n"
                  "import plop.diagnosis, plop.finetune.compare\n"
                  "print(loaded, callable(plop.diagnose), callable(plop.compare), plop.PlopError.__module__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True", "plop.errors"]
    import plop
    from plop import errors

    for name in ("PlopError", "ConfigError", "DataError", "ModelError", "NonFiniteError", "ReportError", "FileError",
                 "UnsafeRegexError", "FieldTypeError"):
        assert getattr(plop, name) is getattr(errors, name)
        assert issubclass(getattr(plop, name), errors.PlopError)
    assert set(plop.__all__) <= set(dir(plop))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        plop.no_such_name  # noqa: B018


def test_cli_modules_stay_short_and_handlers_thin():
    """A command module holds its parser and a handler that parses, calls the API and renders."""
    for path in (PACKAGE / "cli").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 200, path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 40, f"{path.name}:{node.name}"


def _code(path: Path) -> str:
    """A module's code without its docstrings and comments."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


# rule -> (a regex of its code, the one module allowed to hold it)
RULES = {
    "the default lora_alpha": (r"\b2 \* (r|rank|self\.rank)\b", {"config.py"}),
    "PEFT's target matching": (r"re\.fullmatch\(target|\.endswith\('\.' \+", {"model/roles.py"}),
    "NFN's random baseline": (r"math\.sqrt\([^)]*(shape\[|d_in)", {"measure/nfn.py"}),
    "the until_stable policy": (r"until_stable and|STABLE_MIN_ROWS =", {"config.py"}),
    "reading a strategy from its shorthands": (r"'allocate' if allocate\b", {"config.py"}),
    "row sampling": (r"permutation\(n_rows\)|\[: *config\.samples\]", {"files/data.py"}),
    "building a LoraConfig": (r"\bLoraConfig\((target|\*\*\w*lora_\w*kwargs)", {"placement.py"}),
    "the per-layer selection": (r"key=lambda m: m\.nfn", set()),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_has_one_home(rule):
    pattern, homes = RULES[rule]
    holders = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if re.search(pattern, _code(p))}
    assert holders == homes, f"{rule} is written in {sorted(holders)}"


# -- prose that names code --------------------------------------------------------------------
DOTTED = re.compile(r"\bplop(?:\.[A-Za-z_]\w*)+")


def _prose(path: Path) -> str:
    """A module's docstrings (of the module, its classes, functions and attributes) and comments."""
    text = path.read_text()
    docs = [node.value.value for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    return "\n".join(docs + comments)


def _defined(scope: ast.AST) -> dict[str, ast.AST]:
    """The names a module or class body defines (also under ``if``/``try``), and a class's
    ``self.x`` attributes, each with the node that defines it."""
    names: dict[str, ast.AST] = {}
    for node in ast.iter_child_nodes(scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id: node for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0]: node for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            names |= _defined(node)
    if isinstance(scope, ast.ClassDef):
        names |= {t.attr: t for n in ast.walk(scope) if isinstance(n, (ast.Assign, ast.AnnAssign))
                  for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                  if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return names


def _source(parts: list[str]) -> Path | None:
    path = PACKAGE.parent.joinpath(*parts)
    return next((p for p in (path / "__init__.py", path.with_suffix(".py")) if p.is_file()), None)


def _lookup(dotted: str) -> ast.AST | None:
    """What defines ``plop.a.b.C.d``: the longest module it starts with, then each name in turn,
    through relative imports to where a name is defined and through a class's bases."""
    parts = dotted.split(".")
    cut = next(c for c in range(len(parts), 0, -1) if _source(parts[:c]))
    source = _source(parts[:cut])
    package = parts[:cut] if source.name == "__init__.py" else parts[: cut - 1]
    scope: ast.AST = ast.parse(source.read_text())
    for at in range(cut, len(parts)):
        found = _defined(scope).get(parts[at])
        if isinstance(found, ast.ImportFrom) and found.level:  # look where the name is defined
            original = next(a.name for a in found.names if (a.asname or a.name) == parts[at])
            anchor = package[: len(package) - found.level + 1]
            return _lookup(".".join([*anchor, *filter(None, [found.module]), original, *parts[at + 1:]]))
        if found is None and isinstance(scope, ast.ClassDef):  # inherited
            found = next((n for b in scope.bases if isinstance(b, ast.Name)
                          for n in [_lookup(".".join([*parts[:at - 1], b.id, parts[at]]))] if n is not None), None)
        if found is None:
            return None
        scope = found
    return scope


def test_prose_names_only_modules_and_names_that_exist():
    """Every dotted ``plop.`` path a docstring or comment names resolves: a module that moved or a
    function that was renamed leaves no pointer to where it no longer is."""
    stale = sorted({f"{_module_name(p)}: {name}" for p in PACKAGE.rglob("*.py") for name in DOTTED.findall(_prose(p))
                    if _lookup(name) is None})
    assert not stale


def test_only_placement_and_lora_settings_carry_targets_and_lora_settings():
    """``Placement`` and ``LoraSettings`` are the records that carry where adapters go and how they
    are built between packages: no other dataclass declares a field of theirs. One exception:
    ``CompareRow.rank_pattern``, a flat JSON result record of what one comparison run trained (an
    allocation's rank per type), not settings passed on to another package."""
    carried = {"target_modules", "target_parameters", "rank_pattern", "lora_alpha", "lora_dropout", "use_dora",
               "loraplus_ratio"}
    holders = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                fields = {st.target.id for st in node.body if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)}
                if fields & carried:
                    holders[node.name] = sorted(fields & carried)
    assert holders == {"Placement": ["rank_pattern", "target_modules", "target_parameters"],
                       "LoraSettings": ["loraplus_ratio", "use_dora"],
                       "CompareRow": ["rank_pattern"]}, holders
