"""Videos of evaluation episodes: the render backend check, frames, GIF or MP4 files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

VIDEO_FPS = 30
_FFMPEG_HINT = (
    "writing .mp4 needs the imageio-ffmpeg package: `pip install imageio-ffmpeg` "
    "(or `pip install -e '.[render]'` in the project), or write a .gif instead "
    "(--render out.gif)"
)


def require_ffmpeg(path: str | os.PathLike) -> None:
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise RuntimeError(f"cannot write {path}: {_FFMPEG_HINT}")


def write_video(frames, path: str, fps: int = VIDEO_FPS) -> str:
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
        require_ffmpeg(out)
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


def check_render_backend(env_id: str | None = None, path: str | None = None) -> None:
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
        require_ffmpeg(path)


def render_frame(env) -> np.ndarray:
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
        raise RuntimeError("the env returned no frame; it does not support render_mode='rgb_array'")
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
