"""MuJoCo offscreen rendering for Safety-Gymnasium on gymnasium 1.x.

Three problems, all about rendering (vector observations, rewards and costs
never touch OpenGL):

R1. ``render_mode="rgb_array"`` fails with ``OffScreenViewer.__init__()
    missing 2 required positional arguments: 'width' and 'height'``.
    safety-gymnasium 1.0.0 (``safety_gymnasium.bases.underlying``) builds
    ``OffScreenViewer(model, data)`` the gymnasium-0.28 way: the frame size
    came from ``model.vis.global_.offwidth/offheight``, which upstream sets
    right before it asks for the viewer. gymnasium 1.x takes ``width`` and
    ``height`` as arguments. :func:`patch_underlying` replaces the
    ``OffScreenViewer`` name *in that module only* with
    :class:`SafetyOffScreenViewer` (made by :func:`offscreen_viewer_class`), a
    subclass of gymnasium's viewer that reads the size from the model when it
    is not given, checks the GL backend first (below) and frees its context
    once only (gymnasium frees it in ``close()`` and again in ``__del__``).
    Velocity tasks render through gymnasium's own ``MujocoRenderer``, which
    passes the size and needs no fix.

R2. No usable GL backend. MuJoCo renders offscreen through EGL (``libEGL``;
    a GPU driver, or Mesa's software rasteriser) or OSMesa (``libOSMesa``,
    software only). Which one works depends on the machine, and a failure
    surfaces deep inside PyOpenGL with messages such as ``'NoneType' object has
    no attribute 'glGetError'``. :func:`ensure_offscreen_backend` finds out
    *before* an env renders: it creates a tiny context plus an ``MjrContext``
    in a subprocess for the backend named by ``MUJOCO_GL`` (or, when unset,
    for ``egl`` then ``osmesa``) and raises :class:`NoOffscreenBackendError`
    (a ``RuntimeError``) saying that no backend is available and how to get
    one. A subprocess, because a failed attempt is not undoable in-process:
    importing ``mujoco.osmesa``/``mujoco.egl`` sets ``PYOPENGL_PLATFORM`` in
    ``os.environ`` and leaves PyOpenGL bound to that platform, so a failed
    OSMesa probe would break a later EGL one (and a broken driver may crash
    the process). Results are cached per process. When ``MUJOCO_GL`` is unset
    the backend found is written to ``os.environ["MUJOCO_GL"]``, so that
    gymnasium's viewer uses the backend that was checked (left alone,
    gymnasium tries glfw first).

R3. ``MUJOCO_GL=osmesa`` (or ``egl``) without the library breaks ``import
    mujoco`` itself: ``mujoco/__init__`` imports its GL context module for
    that backend, PyOpenGL fails with an ``AttributeError`` (not an
    ``ImportError``, which mujoco would have ignored), and so every
    Safety-Gymnasium task fails even without rendering.
    :func:`import_mujoco` (called by ``cvpo.envs._compat`` before it imports
    safety_gymnasium) checks first whether the backend's shared libraries
    can be loaded at all (the same file names PyOpenGL tries); if not,
    ``mujoco`` is imported with ``MUJOCO_GL=disable`` for the duration of that
    import only, so physics works and ``MUJOCO_GL`` keeps its value. Should
    the import still fail with the variable set, it is retried once the same
    way after dropping the half-imported modules. Rendering then fails with
    the R2 error, which names the missing library.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import subprocess
import sys
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

OFFSCREEN_BACKENDS = ("egl", "osmesa")
# Backends gymnasium's OffScreenViewer knows; glfw needs a display.
SUPPORTED_BACKENDS = ("egl", "osmesa", "glfw")
OFFSCREEN_RENDER_MODES = frozenset({"rgb_array", "depth_array", "rgbd_tuple"})

NO_BACKEND_HINT = (
    "Install one and select it with MUJOCO_GL: on GPU machines `apt-get install libegl1` "
    "and MUJOCO_GL=egl; on CPU-only machines `apt-get install libosmesa6` and "
    "MUJOCO_GL=osmesa (software rendering, slower). Unset MUJOCO_GL to let cvpo try egl, "
    "then osmesa. cvpo/PointHazard-v0 renders without OpenGL."
)

# Shared libraries that PyOpenGL loads for each platform (it tries libNAME.so,
# then libNAME.so.9 ... libNAME.so.0); "OpenGL" and "GL" are alternatives.
_GL_LIBRARIES: dict[str, tuple[tuple[str, ...], ...]] = {
    "egl": (("EGL",), ("OpenGL", "GL")),
    "osmesa": (("OSMesa",),),
}
_APT_PACKAGE = {"egl": "libegl1", "osmesa": "libosmesa6"}

PROBE_TIMEOUT_S = 60.0
_PROBE_SCRIPT = """
import importlib, sys
backend = sys.argv[1]
context = importlib.import_module("mujoco." + backend).GLContext(16, 16)
context.make_current()
import mujoco
model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='.1'/></worldbody></mujoco>")
mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
context.free()
print("cvpo-gl-probe-ok")
"""

_lock = threading.RLock()
_probe_cache: dict[tuple[str, str], tuple[bool, str]] = {}
# The MUJOCO_GL value that import_mujoco had to bypass (None: it did not).
mujoco_imported_without_gl: str | None = None


class NoOffscreenBackendError(RuntimeError):
    """No MuJoCo offscreen OpenGL backend (EGL or OSMesa) can create a context here."""


# --------------------------------------------------------------------------
# R3: import mujoco even when MUJOCO_GL names a backend whose library is missing
# --------------------------------------------------------------------------


def _requested_backend() -> str:
    return os.environ.get("MUJOCO_GL", "").strip().lower()


def _loadable(name: str) -> bool:
    base = f"lib{name}.so"
    for filename in (base, *(f"{base}.{i}" for i in range(9, -1, -1))):
        try:
            ctypes.CDLL(filename)
        except OSError:
            continue
        return True
    return False


def gl_libraries_loadable(backend: str) -> bool:
    """Whether the shared libraries PyOpenGL needs for ``backend`` can be loaded.

    Only a necessary condition: a context may still fail (no device, an old
    driver); :func:`probe_backend` tells for sure.
    """
    groups = _GL_LIBRARIES.get(backend)
    if groups is None:
        return True
    return all(any(_loadable(name) for name in group) for group in groups)


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _drop_modules(prefixes: tuple[str, ...]) -> None:
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


def import_mujoco() -> types.ModuleType:
    """``import mujoco`` that survives a ``MUJOCO_GL`` naming an unusable backend (R3)."""
    global mujoco_imported_without_gl
    module = sys.modules.get("mujoco")
    if module is not None:
        return module
    with _lock:
        backend = _requested_backend()
        if backend in _GL_LIBRARIES and not gl_libraries_loadable(backend):
            with _environ("MUJOCO_GL", "disable"):
                import mujoco
            mujoco_imported_without_gl = backend
            return mujoco
        pyopengl_platform = os.environ.get("PYOPENGL_PLATFORM")
        try:
            import mujoco
        except ImportError:
            raise
        except Exception:
            if not backend or backend in ("disable", "disabled", "off", "false", "0"):
                raise
            # mujoco/__init__ failed while importing its GL module: start over
            # without GL (and without what that attempt left behind).
            _drop_modules(("mujoco", "OpenGL"))
            if pyopengl_platform is None:  # mujoco.osmesa / mujoco.egl set it
                os.environ.pop("PYOPENGL_PLATFORM", None)
            else:
                os.environ["PYOPENGL_PLATFORM"] = pyopengl_platform
            with _environ("MUJOCO_GL", "disable"):
                import mujoco
            mujoco_imported_without_gl = backend
        return mujoco


# --------------------------------------------------------------------------
# R2: which backend can render
# --------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def probe_backend(backend: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether MuJoCo can render with ``backend`` in this environment: ``(ok, detail)``.

    Creates a 16x16 context and an ``MjrContext`` in a subprocess (same
    interpreter and environment, with ``MUJOCO_GL=backend``). ``detail`` says
    why not (the last line of the error, or the missing library). Cached per
    process, keyed by the backend and ``PYOPENGL_PLATFORM``.
    """
    key = (backend, os.environ.get("PYOPENGL_PLATFORM", ""))
    with _lock:
        cached = _probe_cache.get(key)
        if cached is not None:
            return cached
        if backend in _GL_LIBRARIES and not gl_libraries_loadable(backend):
            names = " and ".join(
                "/".join(f"lib{n}" for n in group) for group in _GL_LIBRARIES[backend]
            )
            result = (False, f"{names} not found; `apt-get install {_APT_PACKAGE[backend]}`")
        else:
            env = dict(os.environ, MUJOCO_GL=backend)
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", _PROBE_SCRIPT, backend],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                result = (False, f"creating a context took more than {timeout:.0f} s")
            except OSError as err:
                result = (False, f"could not start the probe: {err}")
            else:
                if proc.returncode == 0 and "cvpo-gl-probe-ok" in proc.stdout:
                    result = (True, "")
                else:
                    detail = _last_line(proc.stderr) or f"exit status {proc.returncode}"
                    result = (False, detail)
        _probe_cache[key] = result
        return result


def clear_probe_cache() -> None:
    """Forget earlier :func:`probe_backend` results (e.g. after installing a library)."""
    with _lock:
        _probe_cache.clear()


def ensure_offscreen_backend() -> str:
    """The MuJoCo GL backend that rendering will use; raises if none works.

    With ``MUJOCO_GL`` set, that backend must work (``egl``, ``osmesa``, or
    ``glfw`` with a display). Unset, ``egl`` then ``osmesa`` are tried and the
    first that works is written to ``os.environ["MUJOCO_GL"]``.

    Raises:
        NoOffscreenBackendError: no backend can create a context; the message
            says how to install one.
    """
    requested = _requested_backend()
    if requested:
        if requested not in SUPPORTED_BACKENDS:
            raise NoOffscreenBackendError(
                f"No MuJoCo offscreen rendering backend is available: MUJOCO_GL={requested!r} "
                f"is not one gymnasium can render with ({', '.join(SUPPORTED_BACKENDS)}). "
                + NO_BACKEND_HINT
            )
        ok, detail = probe_backend(requested)
        if ok:
            return requested
        working = [b for b in OFFSCREEN_BACKENDS if b != requested and probe_backend(b)[0]]
        instead = f" MUJOCO_GL={working[0]} works on this machine." if working else ""
        raise NoOffscreenBackendError(
            f"No MuJoCo offscreen rendering backend is available: MUJOCO_GL={requested} "
            f"cannot create an OpenGL context ({detail}).{instead} " + NO_BACKEND_HINT
        )
    failures = []
    for backend in OFFSCREEN_BACKENDS:
        ok, detail = probe_backend(backend)
        if ok:
            os.environ["MUJOCO_GL"] = backend
            return backend
        failures.append(f"{backend}: {detail}")
    raise NoOffscreenBackendError(
        "No MuJoCo offscreen rendering backend is available: neither EGL nor OSMesa can "
        f"create an OpenGL context on this machine ({'; '.join(failures)}). " + NO_BACKEND_HINT
    )


# --------------------------------------------------------------------------
# R1: OffScreenViewer(model, data) on gymnasium 1.x
# --------------------------------------------------------------------------

_viewer_class: type | None = None
_live_viewers: weakref.WeakSet = weakref.WeakSet()
_atexit_registered = False


def _free_live_viewers() -> None:
    for viewer in list(_live_viewers):
        with contextlib.suppress(Exception):
            viewer.free()


def _track_viewer(viewer: Any) -> None:
    """Free ``viewer`` at exit, before mujoco's EGL atexit hook terminates the display.

    Without this, a viewer still alive at interpreter exit frees its context in
    ``__del__`` after ``eglTerminate`` and prints "Exception ignored" tracebacks.
    atexit runs hooks last-in first-out, and mujoco registers its hook when the
    first EGL context is made, i.e. before ours (registered after a context
    exists).
    """
    global _atexit_registered
    _live_viewers.add(viewer)
    if not _atexit_registered:
        atexit.register(_free_live_viewers)
        _atexit_registered = True


def offscreen_viewer_class() -> type:
    """:class:`SafetyOffScreenViewer`: gymnasium 1.x's ``OffScreenViewer`` with the 0.28 call."""
    global _viewer_class
    if _viewer_class is not None:
        return _viewer_class
    from gymnasium.envs.mujoco.mujoco_rendering import OffScreenViewer

    class SafetyOffScreenViewer(OffScreenViewer):
        """``OffScreenViewer(model, data)``: size from ``model.vis.global_.offwidth/offheight``."""

        def __init__(
            self,
            model: Any,
            data: Any,
            width: int | None = None,
            height: int | None = None,
            max_geom: int = 1000,
            visual_options: dict | None = None,
        ) -> None:
            ensure_offscreen_backend()
            if width is None:
                width = int(model.vis.global_.offwidth)
            if height is None:
                height = int(model.vis.global_.offheight)
            super().__init__(model, data, width, height, max_geom, dict(visual_options or {}))
            _track_viewer(self)

        def render(self, *args: Any, **kwargs: Any) -> Any:
            # Upstream never makes the context current; with a second env's
            # viewer alive, this one would draw into the other's context.
            self.make_context_current()
            return super().render(*args, **kwargs)

        def free(self) -> None:
            """Frees the MuJoCo and GL contexts; safe to call more than once."""
            context = self.__dict__.pop("opengl_context", None)
            if context is None:
                return
            con = self.__dict__.get("con")
            if con is not None:
                with contextlib.suppress(Exception):
                    context.make_current()
                    con.free()
            context.free()

        def __del__(self) -> None:
            with contextlib.suppress(Exception):
                self.free()

    _viewer_class = SafetyOffScreenViewer
    return _viewer_class


def patch_underlying(underlying_module: types.ModuleType) -> None:
    """Point ``safety_gymnasium.bases.underlying.OffScreenViewer`` at the adapter (R1)."""
    viewer_class = offscreen_viewer_class()
    if getattr(underlying_module, "OffScreenViewer", None) is not viewer_class:
        underlying_module.OffScreenViewer = viewer_class


def close_task_viewers(env: Any) -> None:
    """Free the GL contexts of a Safety-Gymnasium navigation env's viewers.

    ``Builder`` has no ``close()``; its task keeps one viewer per render mode.
    """
    task = getattr(getattr(env, "unwrapped", None), "task", None)
    viewers = getattr(task, "_viewers", None)
    if not isinstance(viewers, dict):
        return
    for viewer in list(viewers.values()):
        free = getattr(viewer, "free", None)
        if callable(free):
            free()
    viewers.clear()
    task.viewer = None
