"""Roll out a checkpoint's policy: mean reward, mean cost, violation rate, video.

Works for any new-API-stack RLlib checkpoint (CVPO, PPO, SAC): the RLModule is
loaded from the checkpoint without starting Ray, and the env is rebuilt with
:func:`cvpo.envs.make_env` from the config stored in the checkpoint.

Security: checkpoints are pickles. Load only checkpoints you trust.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from cvpo.constraints import constraint_names, cost_limits, violation_rate

MODULE_SUBDIR = Path("learner_group") / "learner" / "rl_module" / "default_policy"
CLASS_FILE = "class_and_ctor_args.pkl"


class CheckpointError(ValueError):
    """A checkpoint that does not exist, is not an RLlib one, or is damaged."""


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path`` (a checkpoint, or a trial folder: its newest).

    Returned absolute: RLlib reads paths through pyarrow, which takes a relative
    path for a URI without a scheme and fails (``ArrowInvalid``).
    """
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} does not exist; pass the checkpoint_XXXXXX folder "
            "printed at the end of `rllib train`"
        )
    if not (p / CLASS_FILE).exists():
        found = sorted(p.glob("checkpoint_*"))
        if found and (found[-1] / CLASS_FILE).exists():
            return found[-1]
        raise CheckpointError(
            f"{p} is not an RLlib checkpoint (no {CLASS_FILE}); pass a checkpoint_XXXXXX "
            "folder written by `rllib train` or Algorithm.save()"
        )
    return p


def load_checkpoint_config(ckpt: Path):
    """(Algorithm class, AlgorithmConfig) stored in a checkpoint."""
    import rllib_ext  # noqa: F401  (CVPO must be importable to unpickle its config)

    try:
        with open(ckpt / CLASS_FILE, "rb") as f:
            data = pickle.load(f)
        algo_cls = data["class"]
        args, _ = data["ctor_args_and_kwargs"]
        config_state = args[0]
    except Exception as err:  # noqa: BLE001 (any unpickling failure means damage)
        raise CheckpointError(
            f"checkpoint {ckpt} is damaged ({type(err).__name__}: {err}); "
            "use an earlier checkpoint of the run"
        ) from None
    config = algo_cls.get_default_config()
    if isinstance(config_state, dict):
        config = config.update_from_dict(config_state) if "class" not in config_state else type(
            config
        ).from_state(config_state)
    else:
        config = config_state
    return algo_cls, config


def load_module(ckpt: Path):
    """The RLModule (policy) stored in a checkpoint, on CPU, in eval mode."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    path = ckpt / MODULE_SUBDIR
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {ckpt} holds no policy module at {MODULE_SUBDIR}; it was not written "
            "by a new-API-stack algorithm, or it is incomplete"
        )
    try:
        module = RLModule.from_checkpoint(path)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"could not load the policy of checkpoint {ckpt} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); the checkpoint is damaged"
        ) from None
    module.eval()
    return module


def _policy(module, explore: bool):
    import torch
    from ray.rllib.core.columns import Columns

    dist_cls = (
        module.get_exploration_action_dist_cls() if explore else module.get_inference_action_dist_cls()
    )

    def act(obs: np.ndarray) -> np.ndarray:
        batch = {Columns.OBS: torch.as_tensor(np.asarray(obs, np.float32)[None])}
        with torch.no_grad():
            out = module.forward_exploration(batch) if explore else module.forward_inference(batch)
            if Columns.ACTIONS in out:
                return out[Columns.ACTIONS][0].cpu().numpy()
            dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
            if not explore:
                dist = dist.to_deterministic()
            return dist.sample()[0].cpu().numpy()

    return act


def _check_render_backend(env_id: Optional[str] = None, path: Optional[str] = None) -> None:
    """Fails early, before any rollout, when ``--render`` cannot work.

    Always: ``MUJOCO_GL``, when set, must name a backend gymnasium renders
    with (egl, osmesa, glfw). With ``env_id`` a Safety-Gymnasium task: an
    offscreen GL backend must really create a context (checked in a
    subprocess, see :func:`cvpo.envs._render.ensure_offscreen_backend`;
    ``cvpo/PointHazard-v0`` draws in numpy and needs none). With ``path`` an
    ``.mp4``: imageio-ffmpeg must be installed. Called without arguments, only
    the first check runs; a Safety env then checks its backend when
    :func:`cvpo.envs.make_env` builds it, before the first step.

    Raises:
        RuntimeError: (``NoOffscreenBackendError`` for the GL checks) saying
            what is missing and how to install it.
    """
    from cvpo.envs import _render, is_safety_gymnasium_id

    backend = os.environ.get("MUJOCO_GL")
    if backend and backend.strip().lower() not in _render.SUPPORTED_BACKENDS:
        raise _render.NoOffscreenBackendError(
            f"MUJOCO_GL={backend!r} is not one of {', '.join(_render.SUPPORTED_BACKENDS)}. "
            + _render.NO_BACKEND_HINT
        )
    if env_id is not None and is_safety_gymnasium_id(env_id):
        _render.ensure_offscreen_backend()
    if path is not None and Path(path).suffix.lower() == ".mp4":
        _require_ffmpeg(path)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    env_id: Optional[str] = None,
    episodes: int = 10,
    max_steps: Optional[int] = None,
    explore: bool = False,
    cost_limit: Optional[float] = None,
    seed: int = 0,
    render: Optional[str] = None,
) -> Dict[str, Any]:
    """Rolls out the checkpoint's policy; returns means and the violation rate."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    ckpt = resolve_checkpoint_dir(checkpoint)
    algo_cls, config = load_checkpoint_config(ckpt)
    env_id = env_id or config.env
    if not isinstance(env_id, str):
        raise CheckpointError(f"the checkpoint's env {env_id!r} is not an id; pass --env ID")
    env_config = dict(config.env_config or {})
    keys = constraint_names(getattr(config, "cost_keys", None))
    # one limit per constraint; --cost-limit X applies X to each of them
    limit_spec = cost_limit if cost_limit is not None else getattr(config, "cost_limit", None)
    limits = cost_limits(limit_spec, keys) if limit_spec is not None else None
    module = load_module(ckpt)
    act = _policy(module, explore)
    frames = []
    if render:
        ext = Path(render).suffix.lower()
        if ext not in (".mp4", ".gif"):
            raise ValueError(f"--render must end in .mp4 or .gif, got {render!r}")
        _check_render_backend(env_id, render)
        env_config["render_mode"] = "rgb_array"
    stats = rollout(act, env_id, env_config, keys, episodes=episodes, seed=seed,
                    max_steps=max_steps, frames=frames if render else None)
    returns, costs, lengths = stats["returns"], stats["costs"], stats["lengths"]
    per_key = np.asarray(stats["costs_per_key"], dtype=np.float64).reshape(len(returns), len(keys))
    result: Dict[str, Any] = {
        "checkpoint": str(ckpt),
        "algorithm": algo_cls.__name__,
        "env": env_id,
        "episodes": len(returns),
        "reward_mean": float(np.mean(returns)),
        "reward_std": float(np.std(returns)),
        "cost_mean": float(np.mean(costs)),
        "cost_std": float(np.std(costs)),
        "episode_length_mean": float(np.mean(lengths)),
        # the episode cost is summed over the constraints; so is this limit (display only)
        "cost_limit": None if limits is None else float(sum(limits)),
        "cost_limits": None if limits is None else dict(zip(keys, limits)),
        # an episode violates when ANY constraint's cost exceeds its own limit
        "violation_rate": None if limits is None else violation_rate(per_key, limits),
    }
    if len(keys) > 1:
        result["cost_mean_per_key"] = dict(zip(keys, per_key.mean(axis=0).tolist()))
    if render:
        result["video"] = _write_video(frames, render)
    return result


def rollout(
    act,
    env_id: str,
    env_config: Dict[str, Any],
    cost_keys=("cost",),
    *,
    episodes: int = 10,
    seed: int = 0,
    max_steps: Optional[int] = None,
    frames: Optional[list] = None,
) -> Dict[str, list]:
    """Runs ``act(obs) -> action`` for some episodes; per-episode return, cost (summed over
    ``cost_keys``, and per key), length.

    Actions are clipped to the action bounds, as the EnvRunners do. With
    ``frames`` (a list), the first episode's rendered frames are appended to it.
    """
    from cvpo.envs import make_env

    env = make_env(env_id, **env_config)
    low, high = env.action_space.low, env.action_space.high
    returns, costs, lengths, per_key = [], [], [], []
    steps_total = 0
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            ret, n, done = 0.0, 0, False
            key_costs = np.zeros(len(cost_keys))
            while not done:
                obs, r, term, trunc, info = env.step(np.clip(act(obs), low, high))
                ret += float(r)
                key_costs += [float(info.get(k, 0.0)) for k in cost_keys]
                n += 1
                steps_total += 1
                done = term or trunc or (max_steps is not None and steps_total >= max_steps)
                if frames is not None and ep == 0:
                    frames.append(_render_frame(env))
            returns.append(ret)
            costs.append(float(key_costs.sum()))
            per_key.append(key_costs.tolist())
            lengths.append(n)
            if max_steps is not None and steps_total >= max_steps:
                break
    finally:
        env.close()
    return {"returns": returns, "costs": costs, "lengths": lengths, "costs_per_key": per_key}


def module_policy(module, explore: bool = False):
    """``act(obs) -> action`` from an RLModule (deterministic unless ``explore``)."""
    return _policy(module, explore)


def _render_frame(env) -> np.ndarray:
    """``env.render()`` as an ``(H, W, 3)`` uint8 array, or a RuntimeError saying why not."""
    from cvpo.envs._render import NO_BACKEND_HINT, NoOffscreenBackendError

    try:
        frame = env.render()
    except NoOffscreenBackendError:
        raise
    except Exception as err:  # noqa: BLE001 (MuJoCo / PyOpenGL raise many error types)
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise RuntimeError(
            f"rendering failed ({type(err).__name__}: {first_line}). MuJoCo tasks render "
            f"through an offscreen OpenGL backend (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
            f"here). {NO_BACKEND_HINT}"
        ) from err
    if frame is None:
        raise RuntimeError(
            "the env returned no frame; it does not support render_mode='rgb_array'"
        )
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] not in (3, 4):
        raise RuntimeError(
            f"the env's render() returned an array of shape {frame.shape}; "
            "expected an RGB image (H, W, 3)"
        )
    frame = frame[..., :3]
    if frame.dtype != np.uint8:
        if np.issubdtype(frame.dtype, np.floating) and frame.size and float(frame.max()) <= 1.0:
            frame = frame * 255.0
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    return frame


VIDEO_FPS = 30
_FFMPEG_HINT = (
    "writing .mp4 needs the imageio-ffmpeg package: `pip install imageio-ffmpeg` "
    "(or `pip install -e '.[render]'` in the project), or write a .gif instead "
    "(--render out.gif)"
)


def _require_ffmpeg(path: str | os.PathLike) -> None:
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise RuntimeError(f"cannot write {path}: {_FFMPEG_HINT}")


def _write_video(frames, path: str, fps: int = VIDEO_FPS) -> str:
    """Writes ``frames`` ((H, W, 3) uint8 arrays) to ``path``: ``.gif`` or ``.mp4``.

    GIF through imageio's pillow plugin (always available); MP4 through
    imageio-ffmpeg (optional: ``pip install imageio-ffmpeg``), else a
    RuntimeError that says so. Returns the path written.
    """
    out = Path(path).expanduser()
    ext = out.suffix.lower()
    if ext not in (".gif", ".mp4"):
        raise ValueError(f"video path must end in .gif or .mp4, got {str(path)!r}")
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError(f"no frames to write to {out}")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"frames of different shapes cannot make one video: {sorted(shapes)}")
    if ext == ".mp4":
        _require_ffmpeg(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".gif":
        import imageio.v3 as iio

        # pillow takes the frame duration in milliseconds; loop=0 repeats forever.
        iio.imwrite(out, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
        return str(out)
    import imageio.v2 as imageio

    try:
        imageio.mimwrite(out, frames, format="FFMPEG", fps=fps)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(
            f"writing {out} with ffmpeg failed ({type(err).__name__}: {err}); "
            "write a .gif instead (--render out.gif)"
        ) from err
    return str(out)
