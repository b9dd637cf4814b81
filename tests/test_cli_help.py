"""Every option of every command has help that is true for that command."""

import argparse
import importlib.util
import pathlib

import keras
import numpy as np
import pytest
from helpers import run_cli

from surgery import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands():
    parser = cli._parser()
    found = {"surgery": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
            helps = {a.dest: a.help for a in action._choices_actions}
            assert all(helps.get(name) for name in action.choices), helps
    return found


COMMANDS = _commands()


def _options(parser):
    return [
        action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
    ]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_of_every_command_has_help(name, capsys):
    missing = [
        "/".join(a.option_strings) or a.dest
        for a in _options(COMMANDS[name])
        if not (a.help or "").strip()
    ]
    assert missing == [], f"{name}: options without help: {missing}"
    argv = ["--help"] if name == "surgery" else [name, "--help"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)  # the help formats (no stray % in a help string)
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"surgery"}))
def test_help_names_only_flags_of_its_own_command(name):
    flags = {s for a in COMMANDS[name]._actions for s in a.option_strings}
    for action in _options(COMMANDS[name]):
        for word in action.help.replace(",", " ").replace(";", " ").split():
            word = word.strip("().:'`\"")
            if word.startswith("--"):
                assert word in flags, f"{name} {action.option_strings}: {word}"


def test_workers_help_mentions_ray_only_where_there_is_ray():
    for name, parser in COMMANDS.items():
        flags = {s for a in parser._actions for s in a.option_strings}
        workers = [a for a in parser._actions if "--workers" in a.option_strings]
        if workers:
            assert ("--ray" in workers[0].help) == ("--ray" in flags), name
    assert "--ray" not in _help_of("fold", "--workers")
    assert "--ray" not in _help_of("verify", "--workers")
    assert "--ray" in _help_of("convert", "--workers")


def _help_of(name, flag):
    return next(a.help for a in COMMANDS[name]._actions if flag in a.option_strings)


def test_every_command_that_reads_a_model_takes_weights():
    for parser in COMMANDS.values():
        positionals = {a.dest for a in parser._actions if not a.option_strings}
        if positionals & {"model", "a"}:
            assert "--weights" in {s for a in parser._actions for s in a.option_strings}
    assert {"inspect", "verify", "fold", "recalibrate", "stats"} <= {
        name
        for name, parser in COMMANDS.items()
        if any("--weights" in a.option_strings for a in parser._actions)
    }


@pytest.fixture
def architecture_and_weights(tmp_path):
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(inputs), name="m")
    (tmp_path / "m.json").write_text(model.to_json())
    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(1).normal(size=(12, 5)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    return tmp_path


def test_verify_reads_a_with_its_weights_file(architecture_and_weights, capsys):
    folder = architecture_and_weights
    code, result = run_cli(
        capsys, "verify", folder / "m.json", folder / "m.keras",
        "--weights", folder / "m.weights.h5", "--data", folder / "x.npy",
    )  # fmt: skip
    assert code == 0 and result["identical"] is True and result["samples"] == 12
    code, err = run_cli(
        capsys, "verify", folder / "m.json", folder / "m.keras",
        "--data", folder / "x.npy",
    )  # fmt: skip
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("surgery: error: ")


def test_verify_without_a_compares_against_the_embedded_default(tmp_path, capsys):
    from surgery import default

    x = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    code, result = run_cli(
        capsys, "verify", default.model_path(), "--data", tmp_path / "x.npy"
    )
    assert code == 0 and result["identical"] is True


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec

    def no_matplotlib(name, *args, **kwargs):
        return None if name == "matplotlib" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_matplotlib)
    shard = tmp_path / "s0.npz"
    shard.write_bytes(b"")
    argv = ["merge", shard, "--out", tmp_path / "m.npz", "--plot", tmp_path / "r.png"]
    code, err = run_cli(capsys, *argv)
    assert code == 1 and len(err.splitlines()) == 1
    assert "pip install 'surgery[plot]'" in err
    assert not (tmp_path / "m.npz").exists() and not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("page", ["README.md", "docs/cli.md"])
def test_examples_with_plot_name_the_extra_they_need(page):
    lines = (ROOT / page).read_text().splitlines()
    plots = [i for i, line in enumerate(lines) if "--plot" in line]
    assert plots
    for i in plots:
        if lines[i].lstrip().startswith("surgery "):
            nearby = "\n".join(lines[max(0, i - 3) : i + 2])
            assert "[plot]" in nearby, lines[i]
