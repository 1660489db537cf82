"""tnas.config: YAML defaults under argparse, one-line errors, devices, saved configs."""
from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch

from tnas.config import (add_common_args, load_config, parse_args, resolve_device,
                         save_config, seed_everything)
from tnas.errors import TnasError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stage")
    add_common_args(parser)
    parser.add_argument("--n_way", type=int, default=5)
    parser.add_argument("--lr_alpha", type=float, default=30.0)
    parser.add_argument("--second_order", action="store_true")
    parser.add_argument("--steps", type=int, nargs="+", default=[5])
    parser.add_argument("--method", choices=["tnas", "auto_maml"], default="tnas")
    return parser


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_config():
    args = parse_args(make_parser(), [])
    assert args.dataset == "glyphs" and args.device == "auto" and args.seed == 0
    assert args.out is None and args.data_path is None and args.cache_dir is None
    assert args.n_way == 5 and args.second_order is False and args.config is None


def test_yaml_sets_defaults_and_cli_overrides(tmp_path):
    config = write(tmp_path / "x.yaml",
                   "n-way: 20\nlr_alpha: 1e-3\nseed: 7\ndataset: miniimagenet\n")
    args = parse_args(make_parser(), ["--config", str(config), "--seed", "3"])
    assert args.n_way == 20
    assert args.lr_alpha == pytest.approx(1e-3)  # YAML reads "1e-3" as text; converted by type
    assert isinstance(args.lr_alpha, float)
    assert args.seed == 3  # command line wins
    assert args.dataset == "miniimagenet"
    assert args.config == str(config)


def test_store_true_and_list_from_yaml(tmp_path):
    config = write(tmp_path / "x.yaml", "second_order: true\nsteps: [5, 10]\n")
    args = parse_args(make_parser(), ["--config", str(config)])
    assert args.second_order is True
    assert args.steps == [5, 10]
    args = parse_args(make_parser(), ["--config", str(config), "--steps", "1", "2", "3"])
    assert args.steps == [1, 2, 3]


def test_store_true_rejects_non_bool(tmp_path):
    config = write(tmp_path / "x.yaml", "second_order: 'yes please'\n")
    with pytest.raises(TnasError, match="second_order"):
        parse_args(make_parser(), ["--config", str(config)])


def test_unknown_yaml_key_names_key_file_and_close_match(tmp_path):
    config = write(tmp_path / "bad.yaml", "n_wya: 5\n")
    with pytest.raises(TnasError) as info:
        parse_args(make_parser(), ["--config", str(config)])
    message = str(info.value)
    assert "'n_wya'" in message and str(config) in message and "n_way" in message
    assert "\n" not in message


def test_missing_config_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TnasError, match="nope.yaml"):
        parse_args(make_parser(), ["--config", str(missing)])


def test_invalid_yaml_names_path_and_line(tmp_path):
    config = write(tmp_path / "broken.yaml", "n_way: 5\nseed: [1, 2\nlr_alpha: 3\n")
    with pytest.raises(TnasError) as info:
        parse_args(make_parser(), ["--config", str(config)])
    assert "broken.yaml" in str(info.value) and "line" in str(info.value)


def test_top_level_must_be_mapping(tmp_path):
    config = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(TnasError, match="mapping"):
        parse_args(make_parser(), ["--config", str(config)])


def test_bad_value_type_and_choice_in_yaml(tmp_path):
    config = write(tmp_path / "x.yaml", "n_way: five\n")
    with pytest.raises(TnasError, match="n_way"):
        parse_args(make_parser(), ["--config", str(config)])
    config = write(tmp_path / "y.yaml", "method: darts\n")
    with pytest.raises(TnasError, match="method"):
        parse_args(make_parser(), ["--config", str(config)])


def test_unknown_cli_flag_names_flag():
    with pytest.raises(TnasError) as info:
        parse_args(make_parser(), ["--n_wya", "5"])
    assert "--n_wya" in str(info.value) and "--n_way" in str(info.value)


def test_bad_command_line_value_is_one_error_line_not_a_usage_block(capsys):
    with pytest.raises(TnasError, match=r"^argument --n_way: invalid int value: 'five'$"):
        parse_args(make_parser(), ["--n_way", "five"])
    with pytest.raises(TnasError, match=r"^argument --method: invalid choice: 'darts'"):
        parse_args(make_parser(), ["--method", "darts"])
    assert capsys.readouterr().err == ""  # argparse printed no usage block
    parser = make_parser()
    with pytest.raises(TnasError):
        parse_args(parser, ["--n_way", "five"])
    with pytest.raises(SystemExit):  # the parser itself is left as argparse made it
        parser.parse_args(["--n_way", "five"])


def test_a_shortened_flag_is_refused_naming_the_flags_it_starts(tmp_path):
    """argparse would take --lr for --lr_alpha; a stage refuses it, so a typo never sets another flag."""
    with pytest.raises(TnasError) as info:
        parse_args(make_parser(), ["--lr", "0.1"])
    assert str(info.value) == "unknown command-line argument(s): --lr 0.1 (did you mean --lr_alpha?)"
    with pytest.raises(TnasError, match="did you mean --second_order"):
        parse_args(make_parser(), ["--second"])
    assert parse_args(make_parser(), ["--lr_alpha", "0.1"]).lr_alpha == 0.1
    with pytest.raises(TnasError, match=r"unknown command-line argument\(s\): --conf x.yaml \(did you mean --config"):
        parse_args(make_parser(), ["--conf", "x.yaml"])  # not read as --config (a 'file not found' for x.yaml)


def test_include_is_overridden_by_includer(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "common.yaml", "n_way: 20\nseed: 1\n")
    config = write(tmp_path / "exp.yaml", "include: base/common.yaml\nseed: 9\n")
    args = parse_args(make_parser(), ["--config", str(config)])
    assert args.n_way == 20 and args.seed == 9


def test_include_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(TnasError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_save_load_round_trip_and_reuse_as_config(tmp_path):
    args = parse_args(make_parser(), ["--n_way", "3", "--second_order", "--out", str(tmp_path)])
    args.extra_path = tmp_path / "p"  # non-plain value becomes text
    args.shape = (1, 2)
    save_config(args, tmp_path / "run" / "config.yaml")
    loaded = load_config(tmp_path / "run" / "config.yaml")
    assert loaded["n_way"] == 3 and loaded["second_order"] is True
    assert loaded["extra_path"] == str(tmp_path / "p") and loaded["shape"] == [1, 2]
    assert list((tmp_path / "run").iterdir()) == [tmp_path / "run" / "config.yaml"]
    text = (tmp_path / "run" / "config.yaml").read_text()
    keys = [line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()]
    assert "n_way" in keys and "seed" in keys
    assert keys == sorted(keys)
    del loaded["extra_path"], loaded["shape"]
    save_config(loaded, tmp_path / "again.yaml")
    again = parse_args(make_parser(), ["--config", str(tmp_path / "again.yaml")])
    assert again.n_way == 3 and again.second_order is True and again.out == str(tmp_path)


def test_resolve_device_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_resolve_device_cuda_without_gpu():
    with pytest.raises(TnasError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(TnasError, match="cuda:1"):
        resolve_device("cuda:1")


def test_resolve_device_unknown_name():
    with pytest.raises(TnasError, match="gpu0"):
        resolve_device("gpu0")


def test_seed_everything_repeats_streams():
    seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(1).item())
    assert first == second


# -- a run's saved config.yaml fed back with --config --------------------------------------------
def stage_parsers():
    from tnas.stages import decode, evaluate, protocol, search, train

    return {"search": search.build_parser, "train": train.build_parser, "evaluate": evaluate.build_parser,
            "decode": decode.build_parser, "protocol": protocol.build_parser}


def flag_values(parser: argparse.ArgumentParser, switches_on: bool) -> list:
    """Command-line tokens that set every flag of ``parser`` away from its default: each switch
    on (``--x``) or off (``--no-x``; a store_true switch left out), each other flag a value of
    its type (the last of its choices)."""
    argv = []
    for action in parser._actions:
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        option = action.option_strings[0]
        if option.startswith("--no-"):  # a flag's other spelling (--no-cuda_graph), set through its flag
            continue
        if action.nargs == 0:
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(option if switches_on else "--no-" + option[2:])
            elif switches_on:
                argv.append(option)
            continue
        if action.dest == "cuda_graph":  # auto | on | off, a flag of its own kind
            value = "on" if switches_on else "off"
        elif action.choices is not None:
            value = str(list(action.choices)[-1])
        elif action.type is int:
            value = "7"
        elif action.type is float:
            value = "0.25"
        else:
            value = f"value_of_{action.dest}"
        count = action.nargs if isinstance(action.nargs, int) else (2 if action.nargs in ("+", "*") else None)
        argv += [option] + [value] * count if count else [option, value]
    return argv


@pytest.mark.parametrize("stage", ["search", "train", "evaluate", "decode", "protocol"])
@pytest.mark.parametrize("switches", ["on", "off", "defaults"])
def test_saved_config_reproduces_the_settings(tmp_path, stage, switches):
    """Every stage: the resolved flags a run saves as config.yaml give the same flags back through
    --config, with every boolean flag set each way (and left at its default)."""
    build = stage_parsers()[stage]
    argv = [] if switches == "defaults" else flag_values(build(), switches == "on")
    args = parse_args(build(), argv)
    save_config(args, tmp_path / "config.yaml")
    again = parse_args(build(), ["--config", str(tmp_path / "config.yaml")])
    want, got = vars(args), vars(again)
    del want["config"], got["config"]
    assert got == want
    if switches != "defaults":  # the flags really moved away from their defaults
        assert want != {k: v for k, v in vars(parse_args(build(), [])).items() if k != "config"}


def test_boolean_optional_switch_from_yaml_and_cli(tmp_path):
    """``--x/--no-x`` flags read true, false and null from a file; the command line still wins."""
    from tnas.stages import train

    config = write(tmp_path / "x.yaml", "cosine_lr: false\nper_step_bn: true\nlearn_inner_lr: null\n")
    args = parse_args(train.build_parser(), ["--config", str(config)])
    assert args.cosine_lr is False and args.per_step_bn is True and args.learn_inner_lr is None
    args = parse_args(train.build_parser(), ["--config", str(config), "--cosine_lr", "--no-per_step_bn"])
    assert args.cosine_lr is True and args.per_step_bn is False
    with pytest.raises(TnasError, match="cosine_lr.*true or false"):
        parse_args(train.build_parser(), ["--config", str(write(tmp_path / "y.yaml", "cosine_lr: 1\n"))])


@pytest.mark.parametrize("stage", ["search", "train", "evaluate", "decode", "protocol"])
def test_stage_settings_hold_every_flag(stage):
    """Each stage's typed settings carry exactly its parser's flags (a flag added to one and not the
    other fails here), and flatten back to the parsed values."""
    from tnas.stages import decode, evaluate, protocol, search, train

    module = {"search": search, "train": train, "evaluate": evaluate, "decode": decode, "protocol": protocol}[stage]
    parser = module.build_parser()
    args = parse_args(parser, flag_values(parser, switches_on=True))
    flags = module.settings_from_args(args).to_flags()
    want = {k: v for k, v in vars(args).items() if k != "config"}
    assert flags == want


# -- --help: every flag says what it is, and its default ---------------------------------------------
def all_parsers():
    """``{name: build_parser}`` of every stage and of the scripts that parse their own flags."""
    from script_loader import load_script

    scripts = {name: load_script(f"scripts/{name}.py").build_parser for name in ("genotype", "inspect_data", "reproduce")}
    return {**stage_parsers(), **scripts}


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text ``--help`` prints for ``action`` (defaults filled in), on one line."""
    return " ".join(parser._get_formatter()._expand_help(action).split())


@pytest.mark.parametrize("name", ["search", "train", "evaluate", "decode", "protocol", "genotype", "inspect_data",
                                  "reproduce"])
def test_every_flag_has_help_that_shows_its_default(name):
    """Each flag of each script has a help text, and ``--help`` shows its default value (once) unless
    it has none to show (None, a switch that is off)."""
    from tnas.config import HelpFormatter

    parser = all_parsers()[name]()
    assert parser.formatter_class is HelpFormatter
    missing, unshown = [], []
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = help_of(parser, action)
        if not text.strip():
            missing.append(action.dest)
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            if text.count(f"(default: {action.default})") != 1 or text.count("(default") != 1:
                unshown.append(f"{action.dest}: {text}")
    assert not missing, f"flags without help: {missing}"
    assert not unshown, "defaults not shown once:\n" + "\n".join(unshown)


def test_help_shows_the_config_files_defaults(capsys):
    """``--config FILE --help`` shows the values the run would use: the file's."""
    from script_loader import REPO
    from tnas.stages import search

    demo = f"{REPO}/configs/demo.yaml"
    epochs = load_config(demo)["epochs"]
    assert epochs != search.build_parser().get_default("epochs")
    with pytest.raises(SystemExit) as exit_:
        parse_args(search.build_parser(), ["--config", demo, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"--epochs EPOCHS epochs of meta-training (each ends with a validation) (default: {epochs})" in text


def test_cuda_graph_help_and_every_spelling(tmp_path, capsys):
    """``--no-cuda_graph`` takes no value (nor does --help show one); ``--cuda_graph`` bare, with a mode,
    ``--no-cuda_graph`` and a config's ``cuda_graph: true/false/auto`` all still work."""
    from tnas.stages import search

    text = search.build_parser().format_help()
    assert "--no-cuda_graph [" not in text and "--cuda_graph [auto|on|off]" in text
    assert "--no-cuda_graph       the same as --cuda_graph off" in text
    parse = lambda *argv: parse_args(search.build_parser(), list(argv)).cuda_graph  # noqa: E731
    assert [parse(), parse("--cuda_graph"), parse("--no-cuda_graph")] == ["auto", "on", "off"]
    assert [parse("--cuda_graph", mode) for mode in ("auto", "on", "off")] == ["auto", "on", "off"]
    assert parse("--cuda_graph", "on", "--no-cuda_graph") == "off"
    for value, mode in (("true", "on"), ("false", "off"), ("auto", "auto"), ("off", "off")):
        config = write(tmp_path / f"{value}.yaml", f"cuda_graph: {value}\n")
        assert parse("--config", str(config)) == mode
        assert parse("--config", str(config), "--no-cuda_graph") == "off"
        assert parse("--config", str(config), "--cuda_graph") == "on"
    with pytest.raises(TnasError, match="unknown command-line argument.*: on"):
        parse("--no-cuda_graph", "on")
    with pytest.raises(TnasError, match="--cuda_graph must be one of auto, on, off, got 'maybe'"):
        parse("--cuda_graph", "maybe")


def _stage_of_config(name):
    """The stage a file of configs/ is written for, by its name (None: a reproduce plan, not a stage's)."""
    if name in ("reproduce_paper.yaml", "reproduce_demo.yaml"):
        return None
    name = name[len("reproduce_"):] if name.startswith("reproduce_") else name
    for prefixes, stage in ((("demo_protocol", "protocol"), "protocol"),
                            (("demo_scratch", "demo_maml", "scratch", "maml"), "train"),
                            (("demo", "tnas", "auto_maml"), "search")):
        if name.startswith(prefixes):
            return stage
    raise AssertionError(f"configs/{name}: which stage is it for? (add its prefix here)")


def test_every_shipped_config_parses_for_its_stage():
    """Every YAML in configs/ is a valid config of its stage (an unknown or renamed key, a bad value or a broken
    include fails here, not minutes into a demo or a paper run); the two reproduce plans load as plans."""
    import glob
    import os

    from script_loader import REPO
    from tnas.reproduce import plan as plans
    from tnas.stages import protocol, search, train

    parsers = {"search": search.build_parser, "train": train.build_parser, "protocol": protocol.build_parser}
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    assert len(paths) >= 20
    for path in paths:
        stage = _stage_of_config(os.path.basename(path))
        if stage is None:
            plans.load_plan(path)
            continue
        args = parse_args(parsers[stage](), ["--config", path])
        assert args.config == path
        assert load_config(path).keys() <= set(vars(args)) | {"include"}, path  # nothing dropped on the way
