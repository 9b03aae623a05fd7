"""`rllib --help` and every command's help: clean, complete, no third-party banners."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rllib_ext import cli

RLLIB = Path(sys.executable).with_name("rllib")


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_clean(capsys):
    out = _help(capsys)
    assert "==SUPPRESS==" not in out and "train-file" not in out
    assert out.startswith("usage: rllib [-h] {train,train file,resume,evaluate,report} ...")
    for command in ("train", "resume", "evaluate", "report"):
        assert any(line.strip().startswith(command + " ") for line in out.splitlines()), command
    assert "rllib train file tuned_examples/cvpo/point_hazard_sweep.yaml" in out


def test_train_file_help_names_itself(capsys):
    out = _help(capsys, "train", "file")
    assert out.startswith("usage: rllib train file [-h]")
    assert "train-file" not in out
    for key in ("run", "env", "config", "stop", "checkpoint_config", "max_failures", "num_to_keep"):
        assert key in out


def test_train_help_says_how_to_open_tensorboard(capsys):
    out = _help(capsys, "train")
    assert "tensorboard --logdir <storage>/<experiment>" in out
    for flag in ("--max-failures", "--resume", "--wandb-project", "--no-checkpoint-at-end"):
        assert flag in out


def _parsers():
    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    yield "rllib", top
    for name, parser in sub.choices.items():
        yield f"rllib {name}", parser
    yield "rllib train file", cli.build_train_file_parser()


def test_every_flag_has_help():
    seen = 0
    for name, parser in _parsers():
        assert parser.prog == name
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            seen += 1
            assert action.help and action.help != argparse.SUPPRESS, (
                name,
                action.option_strings or action.dest,
            )
    assert seen > 40


def test_rllib_help_prints_no_banner():
    """The installed console script, as a user runs it: nothing but argparse's help."""
    cmd = [str(RLLIB)] if RLLIB.exists() else [sys.executable, "-m", "rllib_ext.cli"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    for argv in (
        ["--help"],
        ["train", "--help"],
        ["train", "file", "--help"],
        ["evaluate", "--help"],
    ):
        out = subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        assert "Adroit" not in out.stdout + out.stderr
        assert out.stderr == "", out.stderr  # no notices, no warnings
        assert out.stdout.startswith("usage: rllib"), out.stdout[:300]


def test_import_prints_no_banner():
    code = (
        "import rllib_ext, rllib_ext.cli, cvpo.envs; "
        "cvpo.envs.make_env('SafetyPointGoal1-v0').close()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Adroit" not in out.stdout + out.stderr
    assert out.stdout == ""
