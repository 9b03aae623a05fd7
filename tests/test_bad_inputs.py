"""Bad input: every case raises a clear error (type + message naming the key, the
allowed range or a suggestion) from our own code, never a traceback from deep
inside Ray, MuJoCo or cvxpy.

Config errors are checked with ``CVPOConfig()....validate()`` (no Ray), CLI
errors through ``rllib_ext.cli.main`` (exit status 2, one line on stderr), and
checkpoint errors with :func:`rllib_ext.checkpoints.check_algorithm_checkpoint`
and ``CVPO.from_checkpoint``.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import faulty_envs
import pytest

from cvpo.envs import POINT_HAZARD_ID, NoCostSignalError, UnknownEnvError
from rllib_ext import cli
from rllib_ext.checkpoints import CheckpointError, check_algorithm_checkpoint
from rllib_ext.cli import common
from rllib_ext.cvpo import CVPO, CVPOConfig
from rllib_ext.cvpo.validation import CVPOConfigError

REPO = Path(__file__).resolve().parent.parent
OUR_CODE = (str(REPO / "rllib_ext"), str(REPO / "src" / "cvpo"))
P = POINT_HAZARD_ID


def assert_clear(excinfo, exc_type, fragments):
    """Type, message fragments, raised by our code, with no deep chained traceback."""
    err = excinfo.value
    assert type(err) is exc_type, f"{type(err).__name__}: {err}"
    msg = str(err)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert "\n" not in msg.strip(), msg
    raised_in = str(excinfo.traceback[-1].path)
    assert raised_in.startswith(OUR_CODE), f"raised in {raised_in}"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), (
        "chained from " + repr(err.__context__)
    )


# -- CVPOConfig values ---------------------------------------------------------------------
# (id, training kwargs, fragments of the message)
CONFIG_CASES = [
    ("cost_limit-negative", dict(cost_limit=-1.0), ["`cost_limit`=-1.0", "floats >= 0"]),
    ("cost_limit-nan", dict(cost_limit=math.nan), ["`cost_limit`=nan", "floats >= 0"]),
    ("cost_limit-string", dict(cost_limit="25"), ["`cost_limit`='25'", "a float >= 0"]),
    (
        "cost_limit-list-longer-than-constraints",
        dict(cost_limit=[1.0, 2.0]),
        ["`cost_limit`=[1.0, 2.0]", "a list of 1 floats", "['cost']"],
    ),
    (
        "cost_limit-list-shorter-than-constraints",
        dict(cost_keys=["cost", "cost_hazard"], cost_limit=[1.0]),
        ["a list of 2 floats", "['cost', 'cost_hazard']"],
    ),
    ("cost_limit-list-with-negative", dict(cost_limit=[-3.0]), ["`cost_limit`=[-3.0]"]),
    ("estep_kl-zero", dict(estep_kl=0.0), ["`estep_kl`=0.0", "> 0"]),
    ("estep_kl-negative", dict(estep_kl=-0.1), ["`estep_kl`=-0.1", "> 0"]),
    ("estep_kl-inf", dict(estep_kl=math.inf), ["`estep_kl`=inf", "finite"]),
    ("kl_bound-alias", dict(kl_bound=-0.1), ["`estep_kl`=-0.1", "> 0"]),
    ("actor_covariance", dict(actor_covariance="spherical"), ["`actor_covariance`", "'full'"]),
    (
        "num_sampled_actions-1",
        dict(num_sampled_actions=1),
        ["`num_sampled_actions`=1", "integer >= 2"],
    ),
    ("num_sampled_actions-float", dict(num_sampled_actions=8.5), ["`num_sampled_actions`=8.5"]),
    (
        "estep_solver-unknown",
        dict(estep_solver="scipy"),
        ["`estep_solver`='scipy'", "'newton' or 'cvxpy'"],
    ),
    ("estep_lambda_max-inf", dict(estep_lambda_max=math.inf), ["`estep_lambda_max`=inf", "finite"]),
    ("n_step-0", dict(n_step=0), ["`n_step`=0", "an integer > 0"]),
    ("n_step-fraction", dict(n_step=2.5), ["`n_step`=2.5", "an integer"]),
    ("gamma-1", dict(gamma=1.0), ["`gamma`=1.0", "strictly between 0 and 1"]),
    ("gamma-0", dict(gamma=0.0), ["`gamma`=0.0", "strictly between 0 and 1"]),
    ("gamma-nan", dict(gamma=math.nan), ["`gamma`=nan"]),
    ("tau-above-1", dict(tau=1.5), ["`tau`=1.5", "<= 1.0"]),
    ("tau-0", dict(tau=0.0), ["`tau`=0.0", "> 0"]),
    (
        "reward_critic_reduction-unknown",
        dict(reward_critic_reduction="max"),
        ["`reward_critic_reduction`='max'", "'min' or 'mean'"],
    ),
    (
        "cost_critic_reduction-unknown",
        dict(cost_critic_reduction="min"),
        ["`cost_critic_reduction`='min'", "'mean' or 'max'"],
    ),
    ("actor_hiddens-empty", dict(actor_hiddens=[]), ["`actor_hiddens`=[]", "e.g. [128, 128]"]),
    ("critic_hiddens-zero-width", dict(critic_hiddens=[64, 0]), ["`critic_hiddens`=[64, 0]"]),
    ("critic_hiddens-string", dict(critic_hiddens="128"), ["`critic_hiddens`='128'", "list"]),
    (
        "std_min-above-std_max",
        dict(std_min=2.0, std_max=1.0),
        ["`std_min/std_max`=(2.0, 1.0)", "0 < std_min < std_max"],
    ),
    ("std_min-equals-std_max", dict(std_min=0.5, std_max=0.5), ["0 < std_min < std_max"]),
    ("replay_capacity-0", dict(replay_capacity=0), ["`replay_capacity`=0", "an integer > 0"]),
    (
        "replay_capacity-below-batch",
        dict(replay_capacity=100, train_batch_size_per_learner=256),
        ["`replay_capacity`=100", "at least train_batch_size_per_learner=256"],
    ),
    ("training_intensity-0", dict(training_intensity=0), ["`training_intensity`=0", "> 0"]),
    ("training_intensity-negative", dict(training_intensity=-0.5), ["`training_intensity`=-0.5"]),
    (
        "training_intensity-inf",
        dict(training_intensity=math.inf),
        ["`training_intensity`=inf", "finite"],
    ),
    ("episode_horizon-0", dict(episode_horizon=0), ["`episode_horizon`=0", "an integer > 0"]),
    (
        "cost_keys-not-a-list",
        dict(cost_keys="cost"),
        ["`cost_keys`='cost'", "a list of info key strings"],
    ),
    ("cost_keys-empty", dict(cost_keys=[]), ["`cost_keys`=[]", "non-empty list"]),
    ("actor_lr-0", dict(actor_lr=0.0), ["`actor_lr`=0.0", "> 0"]),
    ("mstep_kl_mu-negative", dict(mstep_kl_mu=-0.01), ["`mstep_kl_mu`=-0.01"]),
    (
        "num_reward_critics-0",
        dict(num_reward_critics=0),
        ["`num_reward_critics`=0", "an integer > 0"],
    ),
    (
        "train_batch_size_per_learner-0",
        dict(train_batch_size_per_learner=0),
        ["`train_batch_size_per_learner`=0"],
    ),
    (
        "updates_per_learner_call-0",
        dict(updates_per_learner_call=0),
        ["`updates_per_learner_call`=0"],
    ),
    ("async_sampling-str", dict(async_sampling="yes"), ["`async_sampling`='yes'", "True or False"]),
    (
        "learner_torch_threads-0",
        dict(learner_torch_threads=0),
        ["`learner_torch_threads`=0", "integer"],
    ),
]


@pytest.mark.parametrize(
    "training,fragments", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config_value(training, fragments):
    cfg = CVPOConfig().environment(P).training(**training)
    with pytest.raises(CVPOConfigError) as info:
        cfg.validate()
    assert_clear(info, CVPOConfigError, ["CVPOConfig: "] + fragments)


# -- envs ----------------------------------------------------------------------------------------
# (id, env, env_config, training, error type, fragments)
ENV_CASES = [
    (
        "env-discrete-actions",
        faulty_envs.MODULE_PREFIX + faulty_envs.DISCRETE_ID,
        {},
        {},
        CVPOConfigError,
        ["continuous (Box) action space", "Discrete(4)", faulty_envs.DISCRETE_ID],
    ),
    (
        "env-without-cost-signal",
        faulty_envs.MODULE_PREFIX + faulty_envs.NO_COST_ID,
        {},
        {},
        NoCostSignalError,
        [faulty_envs.NO_COST_ID, "no cost signal", "info['cost']"],
    ),
    (
        "env-cost-key-not-reported",
        P,
        {},
        dict(cost_keys=["cost_vases"]),
        NoCostSignalError,
        ["['cost_vases']", "cost_keys"],
    ),
    (
        "env-unknown-id",
        "SafetyPointGoal9-v0",
        {},
        {},
        UnknownEnvError,
        ["'SafetyPointGoal9-v0'", "Did you mean", "SafetyPointGoal1-v0"],
    ),
    (
        "env-unknown-id-version",
        "cvpo/PointHazard-v1",
        {},
        {},
        UnknownEnvError,
        ["'cvpo/PointHazard-v1'", "Did you mean", P],
    ),
    ("env-not-set", None, {}, {}, CVPOConfigError, ["no env set", ".environment("]),
    (
        "env_config-unknown-kwarg",
        P,
        {"wind": 3},
        {},
        CVPOConfigError,
        ["could not be built", "env_config={'wind': 3}", "wind"],
    ),
    (
        "env_config-bad-on_nonfinite",
        P,
        {"on_nonfinite": "ignore"},
        {},
        CVPOConfigError,
        ["on_nonfinite must be one of ('raise', 'drop')", "'ignore'"],
    ),
]


@pytest.mark.parametrize(
    "env,env_config,training,exc_type,fragments",
    [c[1:] for c in ENV_CASES],
    ids=[c[0] for c in ENV_CASES],
)
def test_bad_env(env, env_config, training, exc_type, fragments):
    cfg = CVPOConfig().training(**training)
    if env is not None:
        cfg.environment(env, env_config=env_config)
    with pytest.raises(exc_type) as info:
        cfg.validate()
    assert_clear(info, exc_type, fragments)


# -- the rllib CLI -------------------------------------------------------------------------------
def _yaml(tmp_path, text, name="exp.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return str(f)


TRAIN = ["train", "--algo", "CVPO", "--env", P]
# (id, argv or a function of tmp_path returning argv, fragments of stderr)
CLI_CASES = [
    (
        "cli-unknown-algo",
        ["train", "--algo", "CVP0", "--env", P],
        ["unknown algorithm 'CVP0'", "Did you mean", "CVPO"],
    ),
    ("cli-no-algo", ["train", "--env", P], ["no algorithm given", "--algo CVPO"]),
    ("cli-no-env", ["train", "--algo", "CVPO"], ["no env given", "--env"]),
    (
        "cli-unknown-env",
        ["train", "--algo", "CVPO", "--env", "SafetyPointGoal9-v0"],
        ["Unknown environment id", "SafetyPointGoal1-v0"],
    ),
    (
        "cli-env-without-cost",
        ["train", "--algo", "CVPO", "--env", faulty_envs.MODULE_PREFIX + faulty_envs.NO_COST_ID],
        ["no cost signal"],
    ),
    (
        "cli-bad-json-config",
        TRAIN + ["--config", "{cost_limit: 3}"],
        ["--config is not valid JSON", "line 1 column 2", "Example"],
    ),
    ("cli-config-not-an-object", TRAIN + ["--config", "[25]"], ["--config must be a JSON object"]),
    (
        "cli-config-unknown-key",
        TRAIN + ["--config", '{"cost_limt": 3}'],
        ["unknown CVPO config key", "'cost_limt'", "cost_limit"],
    ),
    (
        "cli-config-bad-value",
        TRAIN + ["--config", '{"gamma": 1.5}'],
        ["`gamma`=1.5", "between 0 and 1"],
    ),
    (
        "cli-yaml-syntax-error",
        lambda t: ["train", "file", _yaml(t, "exp:\n  run: CVPO\n  config: {cost_limit: [1, 2}\n")],
        ["YAML syntax error", "exp.yaml, line 3"],
    ),
    (
        "cli-yaml-missing-file",
        lambda t: ["train", "file", str(t / "nope.yaml")],
        ["nope.yaml does not exist"],
    ),
    (
        "cli-yaml-without-run",
        lambda t: ["train", "file", _yaml(t, "exp:\n  env: cvpo/PointHazard-v0\n")],
        ["experiment 'exp' needs a `run:` key"],
    ),
    (
        "cli-evaluate-missing-checkpoint",
        lambda t: ["evaluate", str(t / "checkpoint_000009")],
        ["checkpoint_000009 does not exist"],
    ),
    (
        "cli-evaluate-corrupt-checkpoint",
        lambda t: (
            t.joinpath("class_and_ctor_args.pkl").write_bytes(b"\x80\x04garbage"),
            ["evaluate", str(t)],
        )[1],
        ["is damaged"],
    ),
]


@pytest.mark.parametrize(
    "argv,fragments", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_bad_cli_input(argv, fragments, tmp_path, capsys):
    argv = argv(tmp_path) if callable(argv) else argv
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("rllib ")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A real CVPO checkpoint, a real PPO checkpoint, and damaged or misplaced variants."""
    import ray
    from conftest import start_local_ray
    from ray.rllib.algorithms.ppo import PPOConfig

    if not ray.is_initialized():
        start_local_ray()
    root = tmp_path_factory.mktemp("ckpts")
    cfg = (
        CVPOConfig()
        .environment(P)
        .env_runners(num_env_runners=0)
        .training(actor_hiddens=[16], critic_hiddens=[16])
    )
    algo = cfg.build_algo()
    try:
        cvpo = Path(algo.save(str(root / "cvpo" / "checkpoint_000000")).checkpoint.path)
    finally:
        algo.stop()
    ppo_cfg = (
        PPOConfig()
        .environment(P)
        .env_runners(num_env_runners=0)
        .rl_module(model_config={"fcnet_hiddens": [16]})
    )
    algo = ppo_cfg.build_algo()
    try:
        ppo = Path(algo.save(str(root / "ppo")).checkpoint.path)
    finally:
        algo.stop()

    truncated = root / "truncated"
    shutil.copytree(cvpo, truncated)
    state = truncated / "learner_group" / "learner" / "state.pkl"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])  # a write cut off half-way

    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "class_and_ctor_args.pkl").write_bytes(b"this is not a pickle")
    (garbage / "algorithm_state.pkl").write_bytes(b"nor this")

    empty = root / "empty"
    empty.mkdir()
    return {
        "cvpo": cvpo,
        "trial_dir": cvpo.parent,
        "ppo": ppo,
        "truncated": truncated,
        "garbage": garbage,
        "empty": empty,
        "missing": root / "checkpoint_000042",
    }


# (id, which checkpoint, fragments)
CKPT_CASES = [
    ("checkpoint-missing", "missing", ["checkpoint_000042 does not exist"]),
    ("checkpoint-empty-folder", "empty", ["is not an RLlib checkpoint", "class_and_ctor_args.pkl"]),
    (
        "checkpoint-trial-folder",
        "trial_dir",
        ["is not an RLlib checkpoint", "did you mean", "checkpoint_000000"],
    ),
    ("checkpoint-corrupt-pickle", "garbage", ["is damaged", "class_and_ctor_args.pkl"]),
    (
        "checkpoint-cut-off-learner-state",
        "truncated",
        ["is damaged", "learner_group/learner/state.pkl", "cut off"],
    ),
    ("checkpoint-from-PPO", "ppo", ["written by PPO, not CVPO", "PPO.from_checkpoint"]),
]


@pytest.mark.parametrize(
    "which,fragments", [c[1:] for c in CKPT_CASES], ids=[c[0] for c in CKPT_CASES]
)
def test_bad_checkpoint_is_named(checkpoints, which, fragments):
    with pytest.raises(CheckpointError) as info:
        check_algorithm_checkpoint(checkpoints[which], CVPO)
    assert_clear(info, CheckpointError, [str(checkpoints[which].name)] + fragments)


def test_good_checkpoints_pass_the_check(checkpoints):
    assert check_algorithm_checkpoint(checkpoints["cvpo"], CVPO) is CVPO
    from ray.rllib.algorithms.algorithm import Algorithm

    assert check_algorithm_checkpoint(checkpoints["ppo"], Algorithm).__name__ == "PPO"
    assert check_algorithm_checkpoint("s3://bucket/ckpt", CVPO) is None  # remote: left to RLlib


@pytest.mark.parametrize(
    "which,fragments", [c[1:] for c in CKPT_CASES], ids=[c[0] for c in CKPT_CASES]
)
def test_cvpo_from_checkpoint_names_bad_checkpoint(checkpoints, which, fragments):
    with pytest.raises(CheckpointError) as info:
        CVPO.from_checkpoint(str(checkpoints[which]))
    assert str(checkpoints[which].name) in str(info.value)
    for frag in fragments:
        assert frag in str(info.value)
    assert str(info.traceback[-1].path).startswith(OUR_CODE)


# -- GPU requested on a machine without one ------------------------------------------------------
def test_gpu_request_without_gpu_falls_back_to_cpu(caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = CVPOConfig().environment(P).learners(num_gpus_per_learner=1)
    with caplog.at_level(logging.WARNING, logger="rllib_ext.cvpo.validation"):
        cfg.validate()
    assert cfg.num_gpus_per_learner == 0
    notices = [r.getMessage() for r in caplog.records if "num_gpus_per_learner" in r.getMessage()]
    assert len(notices) == 1, notices
    assert "\n" not in notices[0] and "falling back to num_gpus_per_learner=0" in notices[0]
    # Tune's resource request (validated the same way) asks for no GPU, so a trial can start
    pgf = CVPO.default_resource_request(
        CVPOConfig().environment(P).learners(num_gpus_per_learner=1).to_dict()
    )
    assert all(b.get("GPU", 0) == 0 for b in pgf.bundles), pgf.bundles


# -- env_config / unsupported env errors in the CLI ------------------------------------------
# (id, argv, fragments of stderr)
CLI_ENV_CONFIG_CASES = [
    (
        "cli-env_config-unknown-kwarg",
        TRAIN + ["--config", '{"env_config": {"wind": 3}}'],
        ["could not be built", "wind"],
    ),
    (
        "cli-env_config-bad-on_nonfinite",
        TRAIN + ["--config", '{"env_config": {"on_nonfinite": "skip"}}'],
        ["on_nonfinite must be one of", "'skip'"],
    ),
    (
        "cli-unsupported-vision-env",
        ["train", "--algo", "CVPO", "--env", "SafetyPointGoal1Vision-v0"],
        ["Vision", "SafetyPointGoal1-v0"],
    ),
]


@pytest.mark.parametrize(
    "argv,fragments",
    [c[1:] for c in CLI_ENV_CONFIG_CASES],
    ids=[c[0] for c in CLI_ENV_CONFIG_CASES],
)
def test_bad_env_config_in_cli(argv, fragments, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("rllib ")][0]
    for frag in fragments:
        assert frag in line, f"{frag!r} not in {line!r}"


def test_bad_stop_json_fails_before_ray_starts(monkeypatch, capsys):
    def no_ray(args):
        raise AssertionError("Ray would be started before --stop was checked")

    monkeypatch.setattr(common, "init_ray", no_ray)
    code = cli.main(TRAIN + ["--stop", "{training_iteration: 2}"])
    err = capsys.readouterr().err
    assert code == 2 and "--stop is not valid JSON" in err, err
