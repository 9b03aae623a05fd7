"""The `rllib` CLI: help text and clear errors (none of these start training)."""

import subprocess
import sys

import pytest

from rllib_ext import cli


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "rllib_ext.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("train", "evaluate", "report", "rllib train file"):
        assert word in out.stdout
    for sub in ("train", "evaluate", "report"):
        h = run_cli(sub, "--help")
        assert h.returncode == 0 and "usage: rllib" in h.stdout


def _err(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_algorithm_suggests(capsys):
    code, err = _err(capsys, "train", "--algo", "CVP0", "--env", "cvpo/PointHazard-v0")
    assert code == 2
    assert "unknown algorithm 'CVP0'" in err and "CVPO" in err


def test_unknown_env_suggests(capsys):
    code, err = _err(capsys, "train", "--algo", "CVPO", "--env", "SafetyPointGoal9-v0")
    assert code == 2
    assert "SafetyPointGoal1-v0" in err


def test_bad_json_config(capsys):
    code, err = _err(
        capsys,
        "train",
        "--algo",
        "CVPO",
        "--env",
        "cvpo/PointHazard-v0",
        "--config",
        "{cost_limit: 3}",
    )
    assert code == 2 and "--config is not valid JSON" in err


def test_bad_config_value_names_key(capsys):
    code, err = _err(
        capsys,
        "train",
        "--algo",
        "CVPO",
        "--env",
        "cvpo/PointHazard-v0",
        "--config",
        '{"kl_bound": -1}',
    )
    assert code == 2 and "`estep_kl`" in err  # kl_bound: the accepted alias of estep_kl


def test_unknown_config_key_suggests(capsys):
    code, err = _err(
        capsys,
        "train",
        "--algo",
        "CVPO",
        "--env",
        "cvpo/PointHazard-v0",
        "--config",
        '{"cost_limt": 3}',
    )
    assert code == 2 and "cost_limit" in err


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("exp:\n  run: CVPO\n  config: {cost_limit: [1, 2}\n")
    code, err = _err(capsys, "train", "file", str(f))
    assert code == 2 and f"{f}, line 3" in err


def test_missing_checkpoint(capsys, tmp_path):
    code, err = _err(capsys, "evaluate", str(tmp_path / "nothing"))
    assert code == 2 and "does not exist" in err


def test_corrupt_checkpoint(capsys, tmp_path):
    (tmp_path / "class_and_ctor_args.pkl").write_bytes(b"not a pickle")
    code, err = _err(capsys, "evaluate", str(tmp_path))
    assert code == 2 and "damaged" in err


@pytest.mark.parametrize("argv", [[], ["train"]])
def test_missing_arguments(capsys, argv):
    code = cli.main(argv)
    assert code == 2
