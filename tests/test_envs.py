"""cvpo.envs.make_env: every Safety-Gymnasium task, the error paths, third-party envs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import gymnasium
import numpy as np
import pytest

import cvpo.envs as envs
from cvpo.envs import _compat, _textures

try:
    SAFETY_IDS = envs.list_safety_gymnasium_ids()
    SAFETY_SKIP_REASON = ""
except ImportError as exc:  # safety-gymnasium is an optional dependency of this file only
    SAFETY_IDS = []
    SAFETY_SKIP_REASON = f"safety-gymnasium not importable: {exc}"

needs_safety = pytest.mark.skipif(not SAFETY_IDS, reason=SAFETY_SKIP_REASON or "no ids")

RANDOM_STEPS = 200


# --------------------------------------------------------------------------
# the id list
# --------------------------------------------------------------------------


@needs_safety
def test_safety_id_counts():
    non_race = envs.list_safety_gymnasium_ids(include_race=False)
    assert len(SAFETY_IDS) == 122
    assert len(non_race) == 107
    race = sorted(set(SAFETY_IDS) - set(non_race))
    agents = ("Point", "Car", "Doggo", "Racecar", "Ant")
    assert race == sorted(f"Safety{a}Race{level}-v0" for a in agents for level in range(3))
    for env_id in SAFETY_IDS:
        assert "Vision" not in env_id and "Debug" not in env_id and "Gymnasium" not in env_id
        assert "Multi" not in env_id and not env_id.lower().startswith("ma_")
        assert envs.is_safety_gymnasium_id(env_id)
    # 5 agents x 22 navigation tasks + 6 velocity robots x 2 versions
    assert sum("Velocity" in i for i in SAFETY_IDS) == 12
    # Racecar navigation tasks are not Race tasks.
    assert "SafetyRacecarGoal1-v0" in non_race and "SafetyRacecarRace0-v0" not in non_race


# --------------------------------------------------------------------------
# every task: construct, seeded reset, 200 random steps
# --------------------------------------------------------------------------


@needs_safety
@pytest.mark.parametrize("env_id", SAFETY_IDS)
def test_safety_task_runs(env_id):
    env = envs.make_env(env_id)
    try:
        space = env.observation_space
        assert isinstance(space, gymnasium.spaces.Box) and space.dtype == np.float32
        assert envs.episode_horizon(env) in (500, 1000)

        obs_a, _ = env.reset(seed=7)
        obs_b, _ = env.reset(seed=7)
        assert obs_a.dtype == np.float32
        np.testing.assert_array_equal(obs_a, obs_b)
        assert space.contains(obs_a)

        env.action_space.seed(7)
        saw_cost_terms = False
        for _ in range(RANDOM_STEPS):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            cost = info["cost"]
            assert type(cost) is float and math.isfinite(cost) and cost >= 0.0
            assert isinstance(reward, float) and math.isfinite(reward)
            assert obs.dtype == np.float32 and space.contains(obs), (obs, space)
            terms = {k: v for k, v in info.items() if k.startswith("cost_") and k != "cost_sum"}
            if "cost_sum" in info:
                # Navigation tasks: upstream's indicator cost (constrain_indicator=True):
                # 1 when any individual cost term is positive.
                saw_cost_terms = saw_cost_terms or bool(terms)
                assert cost == float(info["cost_sum"])
                assert cost == (1.0 if any(v > 0 for v in terms.values()) else 0.0)
            if terminated or truncated:
                assert envs.can_terminate_early(env_id) or truncated
                obs, _ = env.reset()
        if "Velocity" not in env_id and not env_id.endswith(("0-v0",)):
            assert saw_cost_terms, "level>=1 navigation tasks report their cost_* terms"
    finally:
        env.close()


@needs_safety
def test_safety_extras():
    # ...Gymnasium-v0 alias, list actions (numpy 2 copy=False breakage), horizon override.
    env = envs.make_env("SafetyPointGoal1Gymnasium-v0", max_episode_steps=5)
    try:
        assert envs.episode_horizon(env) == 5
        env.reset(seed=0)
        ends = []
        for _ in range(5):
            _, _, terminated, truncated, info = env.step([0.1, -0.2])
            assert isinstance(info["cost"], float)
            ends.append(terminated or truncated)
        assert ends == [False] * 4 + [True] and truncated and not terminated
    finally:
        env.close()
    with pytest.raises(envs.UnsupportedEnvError, match="SafetyPointGoal1-v0"):
        envs.make_env("SafetyPointGoal1Vision-v0")


@needs_safety
def test_dataclass_colour_defaults_are_per_instance_arrays():
    """Breakage 2 fix: ndarray defaults became default_factory copies, values unchanged."""
    from safety_gymnasium.assets.color import COLOR
    from safety_gymnasium.assets.geoms import Goal, Hazards

    a, b = Hazards(num=1), Hazards(num=1)
    assert isinstance(a.color, np.ndarray) and a.color is not b.color
    np.testing.assert_array_equal(a.color, COLOR["hazard"])
    a.color[0] = 0.5
    np.testing.assert_array_equal(b.color, COLOR["hazard"])
    np.testing.assert_array_equal(Goal().color * [1, 1, 1, 0.5], COLOR["goal"] * [1, 1, 1, 0.5])


@needs_safety
def test_single_agent_tasks_without_gymnasium_robotics():
    """Breakage 3: with gymnasium_robotics missing, only multi-agent tasks are unavailable."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["gymnasium_robotics"] = None
        import cvpo.envs as envs
        assert len(envs.list_safety_gymnasium_ids()) == 122
        env = envs.make_env("SafetyPointGoal1-v0")
        env.reset(seed=0)
        env.step(env.action_space.sample())
        import safety_gymnasium
        try:
            safety_gymnasium.make_ma("Ant", "2x4")
        except ImportError as exc:
            assert "gymnasium-robotics" in str(exc)
            print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_can_terminate_early():
    assert envs.can_terminate_early(envs.POINT_HAZARD_ID) is False
    assert envs.can_terminate_early("SafetyPointGoal1-v0") is False
    assert envs.can_terminate_early("SafetyRacecarCircle2-v0") is False
    assert envs.can_terminate_early("SafetyHalfCheetahVelocity-v1") is False
    assert envs.can_terminate_early("SafetyHopperVelocity-v1") is True
    assert envs.can_terminate_early("SafetyAntGoal1-v0") is True  # the Ant falls over
    assert envs.can_terminate_early("SafetyPointRace1-v0") is True  # ends at the goal
    assert envs.can_terminate_early("CartPole-v1") is True


# --------------------------------------------------------------------------
# texture handling (Race tasks, skybox)
# --------------------------------------------------------------------------


def test_missing_textures_are_generated_in_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CVPO_TEXTURE_DIR", str(cache))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    big = np.zeros((64, 64, 3), dtype=np.uint8)
    big[::7, ::5] = 255
    _textures._atomic_write_png(shipped / "sky.png", big)
    doc = {
        "mujoco": {
            "compiler": {"@texturedir": str(shipped)},
            "asset": {
                "texture": [
                    {"@name": "village_floor", "@file": "village_floor.PNG", "@type": "2d"},
                    {"@type": "skybox", "@fileup": "sky.png", "@filedown": "sky.png"},
                    {"@name": "checker", "@builtin": "checker"},
                ]
            },
        }
    }
    _compat.fix_texture_files(doc)
    floor, sky, checker = doc["mujoco"]["asset"]["texture"]
    assert os.path.isabs(floor["@file"]) and floor["@file"].startswith(str(cache))
    assert os.path.exists(floor["@file"])
    assert not (shipped / "village_floor.PNG").exists()
    # 64 px < 2 x 256: kept as shipped (absolute path is fine for MuJoCo too).
    assert sky["@fileup"] == str(shipped / "sky.png")
    assert checker == {"@name": "checker", "@builtin": "checker"}
    # A large skybox face is replaced by a 256 px cached copy.
    _textures._atomic_write_png(shipped / "huge.png", np.zeros((600, 600, 3), dtype=np.uint8))
    doc["mujoco"]["asset"]["texture"] = {"@type": "skybox", "@fileup": "huge.png"}
    _compat.fix_texture_files(doc)
    small = doc["mujoco"]["asset"]["texture"]["@fileup"]
    assert small.startswith(str(cache))
    import imageio.v3 as iio

    assert iio.imread(small).shape == (256, 256, 3)
    monkeypatch.setenv("CVPO_SAFETY_SKYBOX", "original")
    doc["mujoco"]["asset"]["texture"] = {"@type": "skybox", "@fileup": "huge.png"}
    _compat.fix_texture_files(doc)
    assert doc["mujoco"]["asset"]["texture"]["@fileup"] == "huge.png"  # left as shipped


# --------------------------------------------------------------------------
# error paths
# --------------------------------------------------------------------------


def test_unknown_id_suggests_close_matches():
    with pytest.raises(envs.UnknownEnvError, match="CartPole-v1") as info:
        envs.make_env("CartPol-v1")
    assert isinstance(info.value, ValueError)
    assert "CartPole-v1" in info.value.suggestions
    with pytest.raises(envs.UnknownEnvError, match="cvpo/PointHazard-v0"):
        envs.make_env("cvpo/PointHazrd-v0")


@needs_safety
def test_unknown_safety_id_suggests_safety_ids():
    with pytest.raises(envs.UnknownEnvError, match="SafetyPointGoal1-v0"):
        envs.make_env("SafetyPointGoa1-v0")


def test_costless_env_raises_no_cost_signal():
    with pytest.raises(envs.NoCostSignalError, match="Pendulum-v1") as info:
        envs.make_env("Pendulum-v1")
    assert isinstance(info.value, ValueError)
    assert "info['cost']" in str(info.value)


def test_missing_safety_gymnasium_message(monkeypatch):
    monkeypatch.setattr(_compat, "_safety_module", None)
    monkeypatch.setattr(_compat, "safety_gymnasium_available", lambda: False)
    with pytest.raises(ImportError) as info:
        envs.make_env("SafetyPointGoal1-v0")
    message = str(info.value)
    assert "make install" in message
    assert "pip install --no-deps safety-gymnasium==1.0.0" in message
    # Non-Safety ids are unaffected.
    env = envs.make_env(envs.POINT_HAZARD_ID)
    env.reset(seed=0)
    env.close()


def test_import_without_safety_gymnasium_installed():
    """A fresh interpreter in which ``import safety_gymnasium`` is blocked."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["safety_gymnasium"] = None  # what an uninstalled package looks like
        import cvpo.envs as envs
        env = envs.make_env(envs.POINT_HAZARD_ID)
        env.reset(seed=0)
        _, _, _, _, info = env.step(env.action_space.sample())
        assert isinstance(info["cost"], float)
        try:
            envs.make_env("SafetyPointGoal1-v0")
        except ImportError as exc:
            assert "pip install --no-deps safety-gymnasium==1.0.0" in str(exc), exc
            assert "make install" in str(exc), exc
            print("OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_bad_on_nonfinite_value():
    with pytest.raises(ValueError, match="on_nonfinite"):
        envs.make_env(envs.POINT_HAZARD_ID, on_nonfinite="ignore")


# --------------------------------------------------------------------------
# third-party envs (registered here)
# --------------------------------------------------------------------------


class _ScriptedCostEnv(gymnasium.Env):
    """float64 observations; info["cost"] = 0.25 * t, or NaN/inf at ``bad_step``."""

    def __init__(self, bad_step=None, bad_signal="cost", bad_value=float("nan")):
        self.observation_space = gymnasium.spaces.Box(-10.0, 10.0, shape=(3,), dtype=np.float64)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.bad_step = bad_step
        self.bad_signal = bad_signal
        self.bad_value = bad_value
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.full(3, 0.5, dtype=np.float64), {}

    def step(self, action):
        cost, reward = 0.25 * self.t, 1.0
        if self.t == self.bad_step:
            if self.bad_signal == "cost":
                cost = self.bad_value
            else:
                reward = self.bad_value
        self.t += 1
        obs = np.full(3, 0.1 * self.t, dtype=np.float64)
        return obs, reward, False, False, {"cost": np.float64(cost), "cost_custom": cost}


_TEST_IDS = {
    "cvpo_test/CostPassThrough-v0": {},
    "cvpo_test/NanCost-v0": {"bad_step": 3},
    "cvpo_test/InfReward-v0": {"bad_step": 2, "bad_signal": "reward", "bad_value": float("inf")},
}
for _id, _kwargs in _TEST_IDS.items():
    if _id not in gymnasium.envs.registry:
        gymnasium.register(
            id=_id, entry_point=_ScriptedCostEnv, kwargs=_kwargs, max_episode_steps=10
        )


def test_third_party_env_with_cost_passes_through():
    env = envs.make_env("cvpo_test/CostPassThrough-v0")
    assert envs.episode_horizon(env) == 10
    assert env.observation_space.dtype == np.float32
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    costs = []
    for t in range(10):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert type(info["cost"]) is float and info["cost"] == 0.25 * t
        assert info["cost_custom"] == 0.25 * t
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        costs.append(info["cost"])
    assert truncated and not terminated
    assert sum(costs) == pytest.approx(0.25 * 45)
    env.close()


def test_nonfinite_cost_raises_with_step_index():
    env = envs.make_env("cvpo_test/NanCost-v0")
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.action_space.sample())
    with pytest.raises(envs.NonFiniteSignalError) as info:
        env.step(env.action_space.sample())
    error = info.value
    assert isinstance(error, ValueError)
    assert error.step == 3 and error.signals == ("cost",) and error.env_id == "cvpo_test/NanCost-v0"
    assert "cvpo_test/NanCost-v0" in str(error) and "step 3" in str(error) and "cost" in str(error)

    env = envs.make_env("cvpo_test/InfReward-v0")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.step(env.action_space.sample())
    with pytest.raises(envs.NonFiniteSignalError, match="reward") as info:
        env.step(env.action_space.sample())
    assert info.value.step == 2 and info.value.signals == ("reward",)


def test_nonfinite_drop_mode():
    env = envs.make_env("cvpo_test/NanCost-v0", on_nonfinite="drop")
    for episode in range(2):
        env.reset(seed=episode)
        for _ in range(3):
            _, _, _, truncated, info = env.step(env.action_space.sample())
            assert not truncated and "nonfinite" not in info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert info["cost"] == 0.0 and reward == 1.0
        assert info["nonfinite"] is True and info["nonfinite_signals"] == ("cost",)
        assert truncated is True and terminated is False
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == (1 if episode == 0 else 0)  # warns once per env
        if runtime:
            assert "cvpo_test/NanCost-v0" in str(runtime[0].message)
    env = envs.make_env("cvpo_test/InfReward-v0", on_nonfinite="drop")
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.step(env.action_space.sample())
    with pytest.warns(RuntimeWarning, match="reward"):
        _, reward, _, truncated, info = env.step(env.action_space.sample())
    assert reward == 0.0 and truncated and info["cost"] == 0.5 and info["nonfinite"]
