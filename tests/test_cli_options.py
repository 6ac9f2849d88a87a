"""The command line is generated from the config fields: a field's type, default, choices, help and
group become its option, and the parsed options build the config back."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from plop.cli import build_parser, main
from plop.cli.inputs import BIG_MODELS
from plop.cli.options import Options, Parser, build
from plop.config import DiagnoseConfig, ModelConfig, option
from plop.errors import ConfigError
from plop.files.data import DataSource, TextFormat
from plop.finetune.config import CompareConfig, TrainConfig
from plop.placement import LoraSettings


@dataclass
class Toy:
    count: int = option(3, "how many", parse="positive", group="g")
    scope: Literal["a", "b"] = option("a", "which scope", group="g")
    names: list[str] | None = option(None, "some names")
    ratio: float = option(0.5, "a ratio", exclusive="x")
    loud: bool = option(False, "say more", exclusive="x")
    hidden: int = option(7, "API only", cli=False)
    renamed: str | None = option(None, "another flag", flag="--other", aliases=("--old",))


def _parser(**kwargs) -> Parser:
    return Options(Parser(prog="toy")).add(Toy, **kwargs).parser


def test_a_field_becomes_its_option_and_builds_the_config_back():
    args = _parser().parse_args(["--count", "5", "--scope", "b", "--names", "x, y", "--ratio", "2.5", "--old", "z"])
    toy = build(Toy, args)
    assert toy == Toy(count=5, scope="b", names=["x", "y"], ratio=2.5, loud=False, renamed="z")
    assert build(Toy, _parser().parse_args([])) == Toy()  # every default is the field's own


def test_types_choices_exclusion_and_api_only_fields_are_enforced(capsys):
    for argv, message in ((["--count", "0"], "positive whole number"), (["--scope", "c"], "invalid choice"),
                          (["--ratio", "1", "--loud"], "not allowed with"), (["--hidden", "1"], "unrecognized")):
        with pytest.raises(SystemExit) as stop:
            _parser().parse_args(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_help_comes_from_the_fields_grouped_as_they_say():
    parser = _parser()
    text = parser.format_help()
    for f in dataclasses.fields(Toy):
        assert (f.metadata["help"] in text) == f.metadata.get("cli", True), f.name
    assert [g.title for g in parser._action_groups if g._group_actions][-1] == "g"


def test_only_skip_and_per_command_defaults():
    parser = _parser(only=("count", "scope", "hidden"), defaults={"count": 9})
    assert vars(parser.parse_args([])) == {"count": 9, "scope": "a"}
    assert "names" not in vars(_parser(skip=("names",)).parse_args([]))


@dataclass
class Other:
    count: int = option(9, "the same field as Toy's", parse="positive", group="g")
    extra: int = option(1, "one more", group="g")


def test_configs_added_to_one_command_share_groups_and_flags_and_the_parser_keeps_no_state():
    parser = Options(Parser(prog="toy")).add(Toy).add(Other).parser
    assert [g.title for g in parser._action_groups].count("g") == 1
    args = parser.parse_args(["--count", "4", "--extra", "2"])
    assert build(Toy, args).count == build(Other, args).count == 4  # one flag feeds both configs
    assert vars(parser).keys() == vars(Parser(prog="toy")).keys()  # the adder's state is its own


@pytest.mark.parametrize("command,configs", [
    ("diagnose", (ModelConfig, DataSource, TextFormat, DiagnoseConfig)),
    ("train", (ModelConfig, DataSource, TextFormat, TrainConfig)),
    ("compare", (CompareConfig,)),
])
def test_every_cli_field_of_a_command_is_an_option(command, configs):
    """Each config field meant for the command line reaches it (a new field needs nothing more)."""
    args = vars(build_parser().parse_args([command]))
    skipped = set(BIG_MODELS) if command == "train" else set()
    for cls in configs:
        for f in dataclasses.fields(cls):
            if isinstance(f.default, LoraSettings):  # a nested config: its own fields are the options
                assert {g.name for g in dataclasses.fields(LoraSettings)} <= args.keys(), f"{cls.__name__}.{f.name}"
            elif f.metadata.get("cli", True) and f.name not in skipped:
                assert f.name in args, f"{cls.__name__}.{f.name}"


def test_a_bad_value_is_one_line_before_any_model_loads(tmp_path, capsys):
    # exit 2 with the config's own message; the model named does not exist, so reaching it would say so
    code = main(["train", str(tmp_path / "no-model"), "--lr", "3", "--output-dir", str(tmp_path / "run")])
    assert code == 2 and "lr must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="lr must be in"):
        TrainConfig(lr=3)


def test_out_names_a_file_and_output_dir_a_folder_in_every_command():
    """One meaning per flag: --out is a file (or stdout), --output-dir a folder; merge's old --out stays
    an alias of its --output-dir."""
    parser = build_parser()
    for argv in (["adapters", "merge", "d", "n", "--output-dir", "x"], ["adapters", "merge", "d", "n", "--out", "x"]):
        assert parser.parse_args(argv).output_dir == "x"
    for command in ("diagnose", "export", "compare", "train", "adapters"):
        sub = parser._subparsers._group_actions[0].choices[command]
        parsers = [sub, *sub._subparsers._group_actions[0].choices.values()] if sub._subparsers else [sub]
        for p in parsers:
            for action in p._actions:
                if "--out" in action.option_strings and action.dest == "out":
                    assert action.metavar in ("FILE", "PATH"), (command, action.metavar)
                if "--output-dir" in action.option_strings:
                    assert action.dest == "output_dir"


def _commands(parser):
    """Every (sub)command's parser, by its path of names."""
    sub = parser._subparsers
    if sub is None:
        return [((), parser)]
    return [((name, *path), p) for name, child in sub._group_actions[0].choices.items()
            for path, p in _commands(child)]


def test_every_list_valued_flag_splits_the_same_way():
    """A flag whose metavar shows a list takes "a, b" as two items, whatever the command."""
    seen = 0
    for path, parser in _commands(build_parser()):
        for action in parser._actions:
            if action.option_strings and "," in str(action.metavar or ""):
                value = build_parser().parse_args([*path, action.option_strings[0], "1, 2"])
                assert len(getattr(value, action.dest)) == 2, (path, action.dest)
                seen += 1
    assert seen == 9  # exclude, placements, seeds, lr grid, selection seeds, train's targets, check's three lists


def test_compare_reads_its_protocol_with_numbers_typed_and_checked(capsys):
    """plop compare's protocol comes from CompareConfig: numbers parsed as numbers, dropout 0 by
    default (nothing an adapter draws may shift a seed's data or samples)."""
    from plop.cli.options import build as build_config

    args = build_parser().parse_args(["compare", "--lr-grid", "0.5,1,2,4", "--seeds", "0,1,2"])
    protocol = build_config(CompareConfig, args)
    assert protocol.lr_grid == (0.5, 1.0, 2.0, 4.0) and protocol.seeds == (0, 1, 2)
    assert protocol.select_seeds == (100, 101) and args.dropout == 0.0
    assert build_parser().parse_args(["train"]).dropout == TrainConfig().lora.dropout == 0.05
    assert build_config(TrainConfig, args).lora == LoraSettings(dropout=0.0, loraplus_ratio=16.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--lr-grid", "half"])
    assert "expected comma-separated numbers, got 'half'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "check"])
def test_target_modules_are_names_or_one_peft_regex_in_every_command(command):
    parser = build_parser()
    assert parser.parse_args([command, "--target-modules", "q_proj, v_proj"]).target_modules == ["q_proj", "v_proj"]
    regex = r".*\.(q|v)_proj"  # a string: PEFT full-matches it against every module name
    assert parser.parse_args([command, "--target-modules", regex]).target_modules == regex
    assert parser.parse_args([command, "--target-modules", r"layers\.[0-3]\.\w{1,2}_proj"]).target_modules == \
        r"layers\.[0-3]\.\w{1,2}_proj"  # the comma of a quantifier does not split a regex


def test_a_regex_given_to_train_places_the_adapters_where_peft_matches_it():
    from plop.model.loading import model_layout
    from plop.ranking.placements import resolve_placement
    from tiny_lm import make_model

    regex = build_parser().parse_args(["train", "--target-modules", r".*\.(q|v)_proj"]).target_modules
    placed = resolve_placement(model_layout(make_model()), target_modules=regex)
    assert placed.target_modules == regex and sorted(placed.types) == ["q_proj", "v_proj"]


def test_every_rank_is_a_positive_whole_number(capsys):
    commands = [path for path, p in _commands(build_parser())
                if any("--rank" in a.option_strings for a in p._actions)]
    assert {c[0] for c in commands} == {"diagnose", "export", "check", "train", "compare"}
    for path in commands:
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args([*path, *(["r.json"] if path == ("export",) else []), "--rank", "0"])
        assert stop.value.code == 2 and "must be a positive whole number" in capsys.readouterr().err
    defaults = {}
    for path, parser in _commands(build_parser()):
        if path in commands:  # --rank is diagnose's rank, and LoraSettings' r elsewhere
            (dest,) = {a.dest for a in parser._actions if "--rank" in a.option_strings}
            args = build_parser().parse_args([*path, *(["r.json"] if path == ("export",) else [])])
            defaults[path[0]] = getattr(args, dest)
    assert defaults == {"diagnose": 16, "check": 16, "train": 16, "compare": 16, "export": None}  # None: the report's
