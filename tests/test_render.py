"""Rendering: PointHazard frames (numpy), video files, MuJoCo GL backend detection.

Only ``test_safety_task_renders_with_a_real_backend`` needs OpenGL; it skips
when this machine has no MuJoCo offscreen backend (EGL or OSMesa). Everything
else runs anywhere: the no-backend paths are simulated.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from cvpo.envs import _render, make_env
from cvpo.envs import point_hazard as ph
from rllib_ext.cli.evaluate import rollout
from rllib_ext.cli.video import check_render_backend, render_frame, write_video

NO_GL_SKIP_REASON = "no MuJoCo offscreen GL backend on this machine"
SAFETY_ID = "SafetyPointGoal1-v0"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gl_env():
    """Restores MUJOCO_GL / PYOPENGL_PLATFORM (ensure_offscreen_backend may set MUJOCO_GL)."""
    saved = {k: os.environ.get(k) for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def no_gl(monkeypatch, gl_env):
    """Every backend probe fails, as on a machine without EGL and OSMesa."""
    calls = []

    def probe(backend, timeout=None):
        calls.append(backend)
        return False, f"simulated: {backend} unavailable"

    monkeypatch.setattr(_render, "probe_backend", probe)
    os.environ.pop("MUJOCO_GL", None)
    return calls


def _mask(frame: np.ndarray, rgb) -> np.ndarray:
    return np.all(frame == np.asarray(rgb, dtype=np.uint8), axis=-1)


def _point_centre(frame: np.ndarray) -> np.ndarray:
    mask = _mask(frame, ph.POINT_RGB) | _mask(frame, ph.POINT_COST_RGB)
    rows, cols = np.nonzero(mask)
    assert rows.size > 0, "the point is not drawn"
    return np.array([cols.mean(), rows.mean()])


# --------------------------------------------------------------------------
# PointHazard: numpy frames
# --------------------------------------------------------------------------


def test_point_hazard_frames():
    env = make_env("cvpo/PointHazard-v0", render_mode="rgb_array")
    assert env.render_mode == "rgb_array"
    env.reset(seed=0)
    first = env.render()
    assert first.shape == (ph.RENDER_SIZE, ph.RENDER_SIZE, 3) and first.dtype == np.uint8
    # hazard disc of radius 0.4 in a 3x3 arena: ~pi*0.16/9 of the image
    hazard_share = _mask(first, ph.HAZARD_RGB).mean()
    assert 0.04 < hazard_share < 0.07
    assert _mask(first, ph.GOAL_RGB).sum() > 20
    start = _point_centre(first)
    assert start[0] < ph.RENDER_SIZE / 3  # the point starts on the left
    for _ in range(10):
        env.step(np.array([1.0, 0.0], dtype=np.float32))
    later = env.render()
    moved = _point_centre(later) - start
    assert moved[0] > 15 and abs(moved[1]) < 3  # moved right (+x) in image coordinates
    assert not np.array_equal(first, later)
    env.close()


def test_point_hazard_point_changes_colour_inside_the_hazard():
    env = make_env("cvpo/PointHazard-v0", render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    while True:
        obs, _, _, _, info = env.step(ph.straight_line_policy(obs))
        if info["cost"] > 0:
            break
    frame = env.render()
    assert _mask(frame, ph.POINT_COST_RGB).sum() > 10
    assert _mask(frame, ph.POINT_RGB).sum() == 0


def test_point_hazard_rendering_changes_nothing_else():
    plain = make_env("cvpo/PointHazard-v0")
    shown = make_env("cvpo/PointHazard-v0", render_mode="rgb_array")
    a, _ = plain.reset(seed=3)
    b, _ = shown.reset(seed=3)
    np.testing.assert_array_equal(a, b)
    for _ in range(100):
        action = ph.straight_line_policy(a)
        a, ra, _, ta, ia = plain.step(action)
        shown.render()
        b, rb, _, tb, ib = shown.step(action)
        np.testing.assert_array_equal(a, b)
        assert (ra, ia["cost"], ta) == (rb, ib["cost"], tb)


def test_point_hazard_render_options():
    small = make_env(
        "cvpo/PointHazard-v0", render_mode="rgb_array", render_width=96, render_height=64
    )
    small.reset(seed=0)
    assert small.render().shape == (64, 96, 3)
    with pytest.raises(ValueError, match="rgb_array"):
        make_env("cvpo/PointHazard-v0", render_mode="human")
    quiet = make_env("cvpo/PointHazard-v0")
    quiet.reset(seed=0)
    with pytest.warns(UserWarning, match="without a render mode"):
        assert quiet.render() is None  # gymnasium's convention


# --------------------------------------------------------------------------
# frames -> video files
# --------------------------------------------------------------------------


def test_rollout_frames_to_gif(tmp_path):
    frames: list = []
    stats = rollout(
        lambda obs: np.array([1.0, 0.2], dtype=np.float32),
        "cvpo/PointHazard-v0",
        {"render_mode": "rgb_array"},
        episodes=1,
        max_steps=30,
        frames=frames,
    )
    assert stats["lengths"] == [30] and len(frames) == 30
    path = write_video(frames, str(tmp_path / "sub" / "episode.gif"))
    assert path.endswith("episode.gif")
    back = iio.imread(path, index=None)
    assert back.shape == (30, ph.RENDER_SIZE, ph.RENDER_SIZE, 3)
    # few colours, so the GIF palette keeps them exactly
    np.testing.assert_array_equal(back[0], frames[0])
    np.testing.assert_array_equal(back[-1], frames[-1])


def test_mp4_without_imageio_ffmpeg_says_what_to_do(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "imageio_ffmpeg" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    frames = [np.zeros((32, 32, 3), np.uint8)] * 3
    out = tmp_path / "episode.mp4"
    with pytest.raises(RuntimeError, match=r"pip install imageio-ffmpeg.*\.gif"):
        write_video(frames, str(out))
    assert not out.exists()
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        check_render_backend(path=str(out))


def test_mp4_roundtrip(tmp_path):
    pytest.importorskip(
        "imageio_ffmpeg", reason="imageio-ffmpeg (optional, for .mp4) not installed"
    )
    frames = [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(5)]
    path = write_video(frames, str(tmp_path / "episode.mp4"))
    assert os.path.getsize(path) > 0


def test_write_video_rejects_bad_input(tmp_path):
    frame = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        write_video([frame], str(tmp_path / "episode.avi"))
    with pytest.raises(ValueError, match="no frames"):
        write_video([], str(tmp_path / "episode.gif"))
    with pytest.raises(ValueError, match="different shapes"):
        write_video([frame, np.zeros((8, 8, 3), np.uint8)], str(tmp_path / "episode.gif"))


def test_render_frame_errors_and_conversion():
    class Env:
        def __init__(self, result):
            self.result = result

        def render(self):
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    with pytest.raises(RuntimeError, match=r"rendering failed \(AttributeError.*apt-get install"):
        render_frame(Env(AttributeError("'NoneType' object has no attribute 'glGetError'")))
    with pytest.raises(RuntimeError, match="no frame"):
        render_frame(Env(None))
    with pytest.raises(RuntimeError, match=r"shape \(4, 4\)"):
        render_frame(Env(np.zeros((4, 4))))
    rgba = render_frame(Env(np.ones((4, 4, 4), np.float32)))
    assert rgba.shape == (4, 4, 3) and rgba.dtype == np.uint8 and rgba.max() == 255


# --------------------------------------------------------------------------
# MuJoCo GL backend detection (simulated: independent of this machine)
# --------------------------------------------------------------------------


def _assert_install_hint(message: str) -> None:
    assert "No MuJoCo offscreen rendering backend is available" in message
    assert "apt-get install libegl1" in message and "MUJOCO_GL=egl" in message
    assert "apt-get install libosmesa6" in message and "MUJOCO_GL=osmesa" in message


def test_no_backend_error_without_mujoco_gl(no_gl):
    with pytest.raises(RuntimeError) as info:
        _render.ensure_offscreen_backend()
    assert isinstance(info.value, _render.NoOffscreenBackendError)
    _assert_install_hint(str(info.value))
    assert "neither EGL nor OSMesa" in str(info.value)
    assert no_gl == ["egl", "osmesa"]
    assert "MUJOCO_GL" not in os.environ


def test_no_backend_error_names_the_requested_backend(no_gl):
    os.environ["MUJOCO_GL"] = "osmesa"
    with pytest.raises(
        RuntimeError, match=r"MUJOCO_GL=osmesa cannot create an OpenGL context"
    ) as info:
        _render.ensure_offscreen_backend()
    _assert_install_hint(str(info.value))
    os.environ["MUJOCO_GL"] = "bogus"
    with pytest.raises(RuntimeError, match="'bogus' is not one"):
        _render.ensure_offscreen_backend()


def test_safety_render_env_reports_missing_backend_before_rendering(no_gl):
    with pytest.raises(RuntimeError) as info:
        make_env(SAFETY_ID, render_mode="rgb_array")
    _assert_install_hint(str(info.value))
    with pytest.raises(RuntimeError) as info:
        check_render_backend(SAFETY_ID, "episode.gif")
    _assert_install_hint(str(info.value))
    # no GL needed: PointHazard, and Safety envs that do not render
    check_render_backend("cvpo/PointHazard-v0", "episode.gif")
    env = make_env(SAFETY_ID)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()


def test_safety_viewer_takes_its_size_from_the_model(monkeypatch):
    # Breakage: upstream calls gymnasium 0.28's OffScreenViewer(model, data).
    import mujoco
    from gymnasium.envs.mujoco import mujoco_rendering

    from cvpo.envs import _compat

    _compat.import_safety_gymnasium()
    underlying = sys.modules["safety_gymnasium.bases.underlying"]
    viewer_class = _render.offscreen_viewer_class()
    assert underlying.OffScreenViewer is viewer_class
    assert issubclass(viewer_class, mujoco_rendering.OffScreenViewer)

    seen = {}

    def fake_init(self, model, data, width, height, max_geom=1000, visual_options=None):
        seen.update(width=width, height=height, max_geom=max_geom)

    monkeypatch.setattr(mujoco_rendering.OffScreenViewer, "__init__", fake_init)
    monkeypatch.setattr(_render, "ensure_offscreen_backend", lambda: "egl")
    model = mujoco.MjModel.from_xml_string(
        "<mujoco><worldbody><geom size='.1'/></worldbody></mujoco>"
    )
    model.vis.global_.offwidth, model.vis.global_.offheight = 123, 77
    viewer = underlying.OffScreenViewer(model, mujoco.MjData(model))
    assert seen == {"width": 123, "height": 77, "max_geom": 1000}
    viewer.free()  # no context was made: a no-op, also for __del__


_MISSING_LIB_SCRIPT = """
import os, sys
from cvpo.envs import _render
# precheck: the library cannot be loaded (as without libOSMesa); fallback: it
# can, but PyOpenGL fails inside `import mujoco` (a fake OpenGL.GL on PYTHONPATH)
_render.gl_libraries_loadable = lambda backend: sys.argv[1] == "fallback"
from cvpo.envs import make_env
env = make_env("SafetyPointGoal1-v0")
env.reset(seed=0)
for _ in range(5):
    env.step(env.action_space.sample())
print("ok", _render.mujoco_imported_without_gl, os.environ["MUJOCO_GL"])
"""


@pytest.mark.parametrize("path", ["precheck", "fallback"])
def test_mujoco_gl_osmesa_without_the_library_does_not_break_physics(path, tmp_path):
    env = dict(os.environ, MUJOCO_GL="osmesa")
    env.pop("PYOPENGL_PLATFORM", None)
    if path == "fallback":
        fake = tmp_path / "OpenGL" / "GL"
        fake.mkdir(parents=True)
        (fake.parent / "__init__.py").write_text("")
        (fake / "__init__.py").write_text(
            "raise AttributeError(\"'NoneType' object has no attribute 'glGetError'\")\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _MISSING_LIB_SCRIPT, path],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok osmesa osmesa"


# --------------------------------------------------------------------------
# a Safety task with a real backend (skips without one)
# --------------------------------------------------------------------------


def test_safety_task_renders_with_a_real_backend(gl_env, tmp_path):
    try:
        backend = _render.ensure_offscreen_backend()
    except _render.NoOffscreenBackendError:
        pytest.skip(NO_GL_SKIP_REASON)
    assert os.environ["MUJOCO_GL"] == backend
    frames: list = []
    rollout(
        lambda obs: np.array([1.0, 0.5], dtype=np.float32),
        SAFETY_ID,
        {"render_mode": "rgb_array", "camera_name": "fixedfar"},
        episodes=1,
        max_steps=8,
        frames=frames,
    )
    assert len(frames) == 8
    for frame in frames:
        assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert frames[0].std() > 5  # a scene, not a blank image
    assert not np.array_equal(frames[0], frames[-1])  # the agent moved
    back = iio.imread(write_video(frames, str(tmp_path / "safety.gif")), index=None)
    assert back.shape == (8, 256, 256, 3)

    env = make_env(SAFETY_ID, render_mode="rgb_array")  # upstream's default camera
    env.reset(seed=1)
    env.step(env.action_space.sample())
    assert env.render().shape == (256, 256, 3)
    task = env.unwrapped.task
    assert task._viewers
    env.close()
    assert not task._viewers  # the GL context was freed
