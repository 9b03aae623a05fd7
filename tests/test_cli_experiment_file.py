"""`rllib train` / `rllib train file`: what reaches Tune (a fake Tuner records it; no training).

Every key of an experiment file is honoured or refused, Tune's old key names are
mapped, --experiment-name renames, flags override the file, --max-failures sets
Tune's FailureConfig and --wandb-project attaches the W&B logger.
"""

import importlib.util
import sys
import types

import pytest
import yaml

from rllib_ext import cli
from rllib_ext.cli import common

P = "cvpo/PointHazard-v0"
TINY = {"num_env_runners": 0, "actor_hiddens": [32, 32], "critic_hiddens": [32, 32]}


class FakeTuner:
    """Stands in for ray.tune.Tuner: records what the CLI passes, trains nothing."""

    made = []
    restored = []
    results = []  # what fit() returns

    def __init__(self, trainable, param_space=None, run_config=None, tune_config=None):
        self.trainable, self.param_space = trainable, param_space
        self.run_config, self.tune_config = run_config, tune_config
        FakeTuner.made.append(self)

    def fit(self):
        return list(FakeTuner.results)

    @classmethod
    def can_restore(cls, path):
        return False

    @classmethod
    def restore(cls, path, trainable, **kwargs):
        cls.restored.append((path, trainable, kwargs))
        return cls(trainable)


@pytest.fixture
def fake_tune(monkeypatch):
    import ray.tune

    FakeTuner.made, FakeTuner.restored, FakeTuner.results = [], [], []
    monkeypatch.setattr(ray.tune, "Tuner", FakeTuner)
    monkeypatch.setattr(common, "init_ray", lambda args: None)
    return FakeTuner


def _file(tmp_path, data, name="exp.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump(data))
    return str(f)


def _exp(**extra):
    spec = {"run": "CVPO", "env": P, "config": dict(TINY), "stop": {"training_iteration": 1}}
    spec.update(extra)
    return spec


def test_file_keys_reach_tune(fake_tune, tmp_path):
    f = _file(
        tmp_path,
        {
            "e1": _exp(
                num_samples=3,
                max_concurrent_trials=2,
                max_failures=4,
                storage_path=str(tmp_path / "res"),
                checkpoint_config={
                    "checkpoint_frequency": 7,
                    "num_to_keep": 2,
                    "checkpoint_at_end": False,
                },
            )
        },
    )
    assert cli.main(["train", "file", f]) == 0
    (t,) = fake_tune.made
    rc = t.run_config
    assert rc.name == "e1" and rc.storage_path == str(tmp_path / "res")
    assert rc.stop == {"training_iteration": 1}
    assert rc.checkpoint_config.checkpoint_frequency == 7
    assert rc.checkpoint_config.num_to_keep == 2
    assert rc.checkpoint_config.checkpoint_at_end is False
    assert rc.failure_config.max_failures == 4
    assert t.tune_config.num_samples == 3 and t.tune_config.max_concurrent_trials == 2
    assert t.param_space["env"] == P and t.param_space["actor_hiddens"] == [32, 32]


def test_flags_override_the_file(fake_tune, tmp_path):
    f = _file(
        tmp_path,
        {"e1": _exp(num_samples=3, max_failures=4, checkpoint_config={"checkpoint_frequency": 7})},
    )
    argv = [
        "train",
        "file",
        f,
        "--num-samples",
        "2",
        "--max-failures",
        "1",
        "--checkpoint-freq",
        "3",
        "--no-checkpoint-at-end",
        "--keep-checkpoints-num",
        "5",
        "--stop",
        '{"training_iteration": 9}',
        "--storage-path",
        str(tmp_path / "s"),
    ]
    assert cli.main(argv) == 0
    rc = fake_tune.made[0].run_config
    assert rc.failure_config.max_failures == 1 and rc.stop == {"training_iteration": 9}
    assert rc.checkpoint_config.checkpoint_frequency == 3 and rc.checkpoint_config.num_to_keep == 5
    assert rc.checkpoint_config.checkpoint_at_end is False
    assert fake_tune.made[0].tune_config.num_samples == 2


def test_train_defaults_and_max_failures(fake_tune, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--algo", "CVPO", "--env", P, "--storage-path", "rel/res"]) == 0
    rc = fake_tune.made[0].run_config
    assert rc.storage_path == str(tmp_path / "rel" / "res")  # relative -> absolute
    assert rc.failure_config.max_failures == 0
    assert rc.checkpoint_config.checkpoint_frequency == 0 and rc.checkpoint_config.checkpoint_at_end
    assert fake_tune.made[0].tune_config.num_samples == 1
    assert cli.main(["train", "--algo", "CVPO", "--env", P, "--max-failures", "-1"]) == 0
    assert fake_tune.made[1].run_config.failure_config.max_failures == -1


def test_experiment_name_renames_a_single_experiment(fake_tune, tmp_path):
    f = _file(tmp_path, {"old-name": _exp()})
    assert (
        cli.main(
            ["train", "file", f, "--experiment-name", "new-name", "--storage-path", str(tmp_path)]
        )
        == 0
    )
    assert fake_tune.made[0].run_config.name == "new-name"


def test_experiment_name_refused_for_several_experiments(fake_tune, tmp_path, capsys):
    f = _file(tmp_path, {"a": _exp(), "b": _exp()})
    assert cli.main(["train", "file", f, "--experiment-name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "rllib train file: error: --experiment-name renames the experiment of a file"
    )
    assert "has 2 (a, b)" in err
    assert fake_tune.made == []


def test_legacy_keys_are_mapped(fake_tune, tmp_path, capsys):
    f = _file(
        tmp_path,
        {
            "e": _exp(
                checkpoint_freq=4,
                checkpoint_at_end=False,
                keep_checkpoints_num=3,
                local_dir=str(tmp_path / "legacy"),
            )
        },
    )
    assert cli.main(["train", "file", f]) == 0
    rc = fake_tune.made[0].run_config
    assert rc.checkpoint_config.checkpoint_frequency == 4
    assert rc.checkpoint_config.checkpoint_at_end is False
    assert rc.checkpoint_config.num_to_keep == 3
    assert rc.storage_path == str(tmp_path / "legacy")
    err = capsys.readouterr().err
    assert (
        "`checkpoint_freq` is Tune's old name for `checkpoint_config.checkpoint_frequency`" in err
    )
    assert "`local_dir` is Tune's old name for `storage_path`" in err


def test_legacy_key_inside_checkpoint_config_is_mapped(fake_tune, tmp_path):
    f = _file(
        tmp_path, {"e": _exp(checkpoint_config={"checkpoint_freq": 6, "keep_checkpoints_num": 2})}
    )
    assert cli.main(["train", "file", f]) == 0
    cc = fake_tune.made[0].run_config.checkpoint_config
    assert (cc.checkpoint_frequency, cc.num_to_keep) == (6, 2)


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            _exp(stopp={"training_iteration": 1}),
            "experiment 'e': unknown key 'stopp' (did you mean 'stop'?); supported keys: "
            "run, env, config, stop, checkpoint_config, num_samples, storage_path, "
            "max_concurrent_trials, max_failures",
        ),
        (
            _exp(checkpoint_config={"frequency": 3}),
            "unknown checkpoint_config key 'frequency' (did you mean 'checkpoint_frequency'?); "
            "supported keys: "
            "checkpoint_frequency, checkpoint_at_end, num_to_keep",
        ),
        (
            _exp(resources_per_trial={"cpu": 2}),
            "key 'resources_per_trial' is not supported here: RLlib sizes",
        ),
        (_exp(name="x"), "key 'name' is not supported here: the experiment's name is its key"),
        (
            _exp(checkpoint_freq=2, checkpoint_config={"checkpoint_frequency": 3}),
            "'checkpoint_freq' (2) and 'checkpoint_config.checkpoint_frequency' (3) "
            "set the same thing "
            "differently; keep only 'checkpoint_config.checkpoint_frequency'",
        ),
        (_exp(num_samples=0), "`num_samples` must be an integer >= 1, got 0"),
        (_exp(max_failures="3"), "`max_failures` must be an integer >= -1, got '3'"),
        (_exp(stop=[1]), "`stop` must be a mapping, got [1]"),
        ({"env": P}, "experiment 'e' needs a `run:` key naming the algorithm"),
    ],
)
def test_unsupported_keys_are_refused(fake_tune, tmp_path, capsys, spec, expected):
    f = _file(tmp_path, {"e": spec})
    assert cli.main(["train", "file", f]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rllib train file: error: {f}: ")
    assert expected in err
    assert fake_tune.made == []


def test_resume_flag_restores_an_existing_experiment(fake_tune, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        FakeTuner, "can_restore", classmethod(lambda cls, p: p.endswith("/res/exp"))
    )
    argv = [
        "train",
        "--algo",
        "CVPO",
        "--env",
        P,
        "--storage-path",
        "res",
        "--experiment-name",
        "exp",
    ]
    assert cli.main(argv + ["--resume"]) == 0
    ((path, trainable, kw),) = fake_tune.restored
    assert path == str(tmp_path / "res" / "exp") and trainable.__name__ == "CVPO"
    assert kw == {"resume_errored": True}
    assert "resuming " + str(tmp_path / "res" / "exp") in capsys.readouterr().out
    assert (
        cli.main(["train", "--algo", "CVPO", "--env", P, "--storage-path", "res2", "--resume"]) == 0
    )
    assert "nothing to resume at" in capsys.readouterr().out and len(fake_tune.restored) == 1


def test_resume_command_errors(tmp_path, capsys):
    assert cli.main(["resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    trial = tmp_path / "exp" / "trial_0"
    trial.mkdir(parents=True)
    (tmp_path / "exp" / "tuner.pkl").write_bytes(b"x")
    assert cli.main(["resume", str(trial)]) == 2
    assert f"did you mean {tmp_path / 'exp'}?" in capsys.readouterr().err
    assert cli.main(["resume", str(tmp_path / "exp")]) == 2
    assert "cannot read the experiment state" in capsys.readouterr().err


# -- Weights & Biases ---------------------------------------------------------------------
def test_wandb_missing_says_pip_install(fake_tune, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert cli.main(["train", "--algo", "CVPO", "--env", P, "--wandb-project", "proj"]) == 2
    err = capsys.readouterr().err
    assert "--wandb-project needs the wandb package: pip install wandb" in err
    assert fake_tune.made == []


def test_wandb_project_attaches_the_logger_callback(fake_tune, monkeypatch):
    import ray.air.integrations.wandb as ray_wandb

    class FakeWandbCallback:
        def __init__(self, project=None, **kw):
            self.project = project

        def setup(self, *a, **kw):
            pass

    if importlib.util.find_spec("wandb") is None:
        monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    monkeypatch.setattr(ray_wandb, "WandbLoggerCallback", FakeWandbCallback)
    assert cli.main(["train", "--algo", "CVPO", "--env", P, "--wandb-project", "proj"]) == 0
    callbacks = fake_tune.made[0].run_config.callbacks
    (wb,) = [c for c in callbacks if isinstance(c, FakeWandbCallback)]
    assert wb.project == "proj"
    assert len(callbacks) == 2  # the progress lines stay
    assert cli.main(["train", "--algo", "CVPO", "--env", P]) == 0
    assert not any(isinstance(c, FakeWandbCallback) for c in fake_tune.made[1].run_config.callbacks)


def test_wandb_without_login_is_a_clear_error(fake_tune, monkeypatch, capsys):
    import ray.air.integrations.wandb as ray_wandb

    class NoKeyCallback:
        def __init__(self, project=None, **kw):
            pass

        def setup(self, *a, **kw):
            raise ValueError("No WandB API key found. Run `wandb login`")

    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb") or types.ModuleType("wandb"))
    monkeypatch.setattr(ray_wandb, "WandbLoggerCallback", NoKeyCallback)
    assert cli.main(["train", "--algo", "CVPO", "--env", P, "--wandb-project", "proj"]) == 2
    err = capsys.readouterr().err
    assert "--wandb-project proj: No WandB API key found" in err and "WANDB_MODE=offline" in err


class FakeResult:
    def __init__(self, path, done, error=None):
        self.path, self.error, self.checkpoint = str(path), error, None
        self.metrics = {"done": done, "training_iteration": 3}
        self.config, self.metrics_dataframe = {"env": P}, None


def test_interrupted_run_says_how_to_resume(fake_tune, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        "train",
        "--algo",
        "CVPO",
        "--env",
        P,
        "--storage-path",
        "res",
        "--experiment-name",
        "e",
    ]
    FakeTuner.results = [FakeResult(tmp_path / "res" / "e" / "t0", done=True)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        f"curves: tensorboard --logdir {tmp_path / 'res' / 'e'}" in out
        and "interrupted:" not in out
    )
    # Ctrl-C: Tune saves the state and returns trials that did not reach their stop
    FakeTuner.results = [FakeResult(tmp_path / "res" / "e" / "t0", done=False)]
    assert cli.main(argv) == 130
    out = capsys.readouterr().out
    assert (
        f"interrupted: 1 trial(s) did not reach the stop criterion; continue with "
        f"`rllib resume {tmp_path / 'res' / 'e'}`"
    ) in out
    FakeTuner.results = [
        FakeResult(tmp_path / "res" / "e" / "t0", done=False, error=RuntimeError("boom"))
    ]
    assert cli.main(argv) == 1
    assert "trial t0 failed: boom" in capsys.readouterr().out
