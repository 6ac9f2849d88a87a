"""The architecture holds: imports only point down, the diagnosis never reaches the fine-tuning,
no function grows past a screen, and the commands that only read a report start without torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "plop"
# the diagnosis side: what a user who never fine-tunes runs
DIAGNOSIS = {"plop.batching", "plop.collector", "plop.config", "plop.coverage", "plop.data", "plop.diagnosis", "plop.distributed",
             "plop.errors", "plop.experts", "plop.fsio", "plop.layers", "plop.models", "plop.names", "plop.nfn",
             "plop.peft_rules", "plop.placement", "plop.ranker", "plop.render", "plop.report", "plop.roles",
             "plop.seq2seq", "plop.untrusted", "plop.version", "plop.weight_scores", "plop.integrations.datasets",
             "plop.integrations.peft"}
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


@pytest.mark.parametrize("argv", [["--help"], ["show", "REPORT"], ["train", "--help"]])
def test_reading_commands_do_not_import_torch(argv, tmp_path):
    from conftest import make_batches, make_llama
    from plop import diagnose

    report = tmp_path / "report.json"
    diagnose(make_llama(), make_batches(8, 8), n_bootstrap=10).save(report)
    argv = [str(report) if a == "REPORT" else a for a in argv]
    code = ("import sys\nfrom plop.cli import main\n"
            f"try:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "print('\\nRESULT', code, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().splitlines()[-1] == "RESULT 0 []"


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
    with pytest.raises(AttributeError):
        plop.no_such_name  # noqa: B018


def test_cli_defaults_are_the_configs_defaults():
    from plop.cli import build_parser
    from plop.config import DiagnoseConfig
    from plop.finetune.config import TrainConfig

    diag = build_parser().parse_args(["diagnose"])
    for field in ("max_length", "batch_size", "seed", "top_k", "rank", "estimator"):
        assert getattr(diag, field) == getattr(DiagnoseConfig(), field), field
    train = build_parser().parse_args(["train"])
    for field in ("rank", "dropout", "lr", "loraplus_ratio", "grad_accum", "eval_fraction", "output_dir",
                  "adapter_name"):
        assert getattr(train, field) == getattr(TrainConfig(), field), field
    assert json.dumps(vars(build_parser().parse_args(["show", "r.json"])), default=str)
