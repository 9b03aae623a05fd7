"""Import and run safety-gymnasium 1.0.0 on gymnasium 1.x / numpy 2 / Python >= 3.11.

Nothing here edits files in site-packages. The numbered breakages refer to
``docs/safety_gymnasium_compat.md``; each fix is applied by
:func:`import_safety_gymnasium` and is as narrow as we could make it:

1. Removed gymnasium modules. safety-gymnasium imports
   ``gymnasium.wrappers.{compatibility,autoreset,env_checker,normalize,time_limit}``
   at module level. For the duration of the import only, we put tiny alias
   modules into ``sys.modules`` that re-export the classes under their new
   gymnasium 1.x names (``EnvCompatibility`` has no successor: its alias
   raises if anybody instantiates it, which only the unused
   ``safety_gymnasium.make(apply_api_compatibility=True)`` would do). An alias
   is installed only when the real module cannot be found, and removed again
   afterwards, so no other library ever sees a fake gymnasium module.

2. ``ValueError: mutable default <class 'numpy.ndarray'> for field color``.
   Python >= 3.11 rejects any unhashable dataclass default; the geom classes
   use ``color: np.array = COLOR[...]``. We do not fake hashability (a
   read-only, hashable ndarray subclass would silently share one array
   between instances, exactly the bug the check prevents) and we do not
   turn the colours into tuples (``self.color * [1, 1, 1, alpha]`` in several
   geoms needs array arithmetic). Instead, while safety-gymnasium is being
   imported, ``dataclasses.dataclass`` is wrapped so that, for classes defined
   in ``safety_gymnasium.*`` only, an ndarray default becomes
   ``field(default_factory=<copy of that array>)``: the Python-3.11-correct
   spelling of what the upstream code means (each instance gets its own
   colour array, with the same values). Only public dataclasses API is used,
   and the original decorator is restored when the import finishes (modules
   that bound the wrapper keep it, but they only use it at class creation).

3. ``gymnasium_robotics`` is imported for the multi-agent tasks. When it is
   not installed we substitute a stub for
   ``safety_gymnasium.tasks.safe_multi_agent.safe_mujoco_multi`` whose
   ``make_ma`` raises ImportError, so the single-agent tasks still work.

4. ``safety_gymnasium.make`` reads ``EnvSpec.apply_api_compatibility``: we
   never call it; :mod:`cvpo.envs` builds tasks from ``gymnasium.spec(id)``.

5. ``BaseAgent._init_jnt_sensors`` passes the 1-element array
   ``model.sensor(i).objid`` to ``MjModel.jnt``, which numpy 2 / mujoco 3 no
   longer accept (Ant, Car and Doggo agents). We wrap the method: during the
   call ``self.engine.model`` is a thin proxy whose ``jnt()`` turns a
   1-element array index into an ``int``; everything else is forwarded.

6. ``BaseAgent.obs_sensor`` calls ``float()`` on a 1-element array (hinge
   joint angles, Ant and Doggo), an error in numpy 2. We wrap the method: it
   runs with ``sensors_angle_components`` off (so upstream reads the raw
   sensors) and we apply the same sin/cos (hinge) and quaternion-to-matrix
   (ball joint) transforms ourselves, using ``.item()``. Keys, order and
   values are identical to the upstream branch.

7. ``Race`` tasks reference textures the wheel lacks. ``safety_gymnasium.world``
   gets a private stand-in for its ``xmltodict`` module whose ``unparse``
   (called once per world build, right before MuJoCo compiles the XML)
   rewrites texture file attributes: a missing file is replaced by a
   generated PNG in the user's cache (see :mod:`cvpo.envs._textures`), and the
   six 3259x3259 skybox images are replaced by cached 256x256 copies unless
   ``CVPO_SAFETY_SKYBOX=original`` (that alone makes ``reset()`` ~15x faster,
   0.63 s -> 0.04 s for SafetyPointGoal1-v0 on the dev machine;
   only rendered frames change).

Further breakage found while building this layer:

8. ``Builder.step`` does ``np.array(action, copy=False)``, which numpy 2
   rejects for anything that needs a copy (a list, a tuple). The adapter in
   :mod:`cvpo.envs._wrappers` passes an ndarray of the action space's dtype.

Rendering (details in :mod:`cvpo.envs._render`):

9. ``render_mode="rgb_array"``: ``OffScreenViewer.__init__() missing 2
   required positional arguments: 'width' and 'height'``. Upstream calls
   gymnasium 0.28's ``OffScreenViewer(model, data)``; gymnasium 1.x wants the
   size. ``safety_gymnasium.bases.underlying.OffScreenViewer`` (that module's
   global only) is replaced by a subclass of gymnasium's viewer that takes the
   size from ``model.vis.global_.offwidth/offheight``, as 0.28 did (upstream
   sets them right before asking for the viewer).

10. ``MUJOCO_GL=osmesa`` (or ``egl``) without that library makes ``import
    mujoco`` itself fail (PyOpenGL raises ``AttributeError ... glGetError``,
    which mujoco does not catch), breaking every task even without rendering.
    Before importing safety_gymnasium we import mujoco ourselves
    (:func:`cvpo.envs._render.import_mujoco`): when the backend's libraries
    cannot be loaded, with ``MUJOCO_GL=disable`` for that import only.
    ``MUJOCO_GL`` keeps its value; rendering then fails with a clear error.

11. No usable offscreen GL backend: detected before an env renders
    (:func:`cvpo.envs._render.ensure_offscreen_backend`, called by the adapter
    in :mod:`cvpo.envs._wrappers` for ``rgb_array``/``depth_array`` envs and by
    the viewer of 9), which raises a ``RuntimeError`` saying how to get one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import sys
import threading
import types
from typing import Any

import numpy as np

from cvpo.envs import _render, _textures
from cvpo.envs._errors import SAFETY_GYMNASIUM_INSTALL_HINT, SafetyGymnasiumImportError

_lock = threading.RLock()
_safety_module: types.ModuleType | None = None

_MULTI_AGENT_MODULE = "safety_gymnasium.tasks.safe_multi_agent.safe_mujoco_multi"
# Modules holding dataclasses with ndarray defaults (and everything that the
# single-agent tasks import); imported inside the breakage-2 window.
_EAGER_MODULES = (
    "safety_gymnasium.assets.geoms",
    "safety_gymnasium.assets.free_geoms",
    "safety_gymnasium.assets.mocaps",
    "safety_gymnasium.tasks",
    "safety_gymnasium.builder",
)


# --------------------------------------------------------------------------
# 1. alias modules for gymnasium modules removed in 1.x
# --------------------------------------------------------------------------


class _EnvCompatibilityUnavailable:
    """Stand-in for gymnasium 0.x ``EnvCompatibility`` (removed in gymnasium 1.0)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "gymnasium.wrappers.EnvCompatibility does not exist in gymnasium 1.x; "
            "build the environment with cvpo.envs.make_env instead of safety_gymnasium.make"
        )


def _alias_contents() -> dict[str, dict[str, Any]]:
    import gymnasium.wrappers as wrappers
    from gymnasium.wrappers.utils import RunningMeanStd

    return {
        "gymnasium.wrappers.compatibility": {"EnvCompatibility": _EnvCompatibilityUnavailable},
        "gymnasium.wrappers.autoreset": {"AutoResetWrapper": wrappers.Autoreset},
        "gymnasium.wrappers.env_checker": {"PassiveEnvChecker": wrappers.PassiveEnvChecker},
        "gymnasium.wrappers.normalize": {
            "NormalizeObservation": wrappers.NormalizeObservation,
            "NormalizeReward": wrappers.NormalizeReward,
            "RunningMeanStd": RunningMeanStd,
        },
        "gymnasium.wrappers.time_limit": {"TimeLimit": wrappers.TimeLimit},
    }


def _module_exists(name: str) -> bool:
    if name in sys.modules:
        # A None entry is the documented way to block an import.
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _install_aliases() -> list[str]:
    installed = []
    for name, contents in _alias_contents().items():
        if _module_exists(name):
            continue
        module = types.ModuleType(name, f"cvpo.envs alias for the removed module {name}")
        module.__dict__.update(contents)
        module.__cvpo_alias__ = True
        sys.modules[name] = module
        installed.append(name)
    return installed


def _remove_aliases(names: list[str]) -> None:
    for name in names:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__cvpo_alias__", False):
            del sys.modules[name]


# --------------------------------------------------------------------------
# 2. ndarray dataclass defaults -> default_factory (during the import only)
# --------------------------------------------------------------------------


def _ndarray_defaults_to_factories(cls: type) -> None:
    if not cls.__module__.startswith("safety_gymnasium"):
        return
    for name in cls.__dict__.get("__annotations__", {}):
        value = cls.__dict__.get(name)
        if isinstance(value, np.ndarray):
            setattr(
                cls,
                name,
                dataclasses.field(default_factory=functools.partial(np.array, value, copy=True)),
            )


def _make_dataclass_wrapper(original):
    @functools.wraps(original)
    def dataclass(cls=None, /, **kwargs):
        def wrap(c):
            _ndarray_defaults_to_factories(c)
            return original(c, **kwargs)

        return wrap if cls is None else wrap(cls)

    return dataclass


# --------------------------------------------------------------------------
# 3. stub for the multi-agent module when gymnasium_robotics is missing
# --------------------------------------------------------------------------


def _install_multi_agent_stub() -> bool:
    if _module_exists("gymnasium_robotics") or _MULTI_AGENT_MODULE in sys.modules:
        return False

    def make_ma(*args: Any, **kwargs: Any):
        raise ImportError(
            "safety-gymnasium's multi-agent tasks need gymnasium-robotics: "
            "pip install gymnasium-robotics"
        )

    module = types.ModuleType(_MULTI_AGENT_MODULE, "cvpo.envs stub (gymnasium_robotics missing)")
    module.make_ma = make_ma
    sys.modules[_MULTI_AGENT_MODULE] = module
    return True


# --------------------------------------------------------------------------
# 5. / 6. numpy-2 fixes in BaseAgent
# --------------------------------------------------------------------------


def _as_index(key: Any) -> Any:
    if isinstance(key, np.ndarray) and key.size == 1:
        return int(key.reshape(-1)[0])
    return key


class _ScalarIndexModel:
    """Forwards to an ``MjModel``; ``jnt()`` accepts a 1-element array index."""

    __slots__ = ("_model",)

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def jnt(self, key: Any) -> Any:
        return self._model.jnt(_as_index(key))


def _patch_base_agent(base_agent_module: types.ModuleType) -> None:
    base_agent_cls = base_agent_module.BaseAgent
    if getattr(base_agent_cls, "__cvpo_patched__", False):
        return
    quat2mat = base_agent_module.quat2mat
    original_init_jnt_sensors = base_agent_cls._init_jnt_sensors
    original_obs_sensor = base_agent_cls.obs_sensor

    @functools.wraps(original_init_jnt_sensors)
    def _init_jnt_sensors(self) -> None:
        # Breakage 5: see the module docstring.
        engine = self.engine
        model = engine.model
        engine.model = _ScalarIndexModel(model)
        try:
            original_init_jnt_sensors(self)
        finally:
            engine.model = model

    @functools.wraps(original_obs_sensor)
    def obs_sensor(self) -> dict[str, np.ndarray]:
        # Breakage 6: see the module docstring.
        conf = self.sensor_conf
        if not conf.sensors_angle_components:
            return original_obs_sensor(self)
        conf.sensors_angle_components = False
        try:
            obs = original_obs_sensor(self)
        finally:
            conf.sensors_angle_components = True
        for name in self.sensor_info.hinge_pos_names:
            theta = np.asarray(obs[name]).reshape(-1)[0].item()
            obs[name] = np.array([np.sin(theta), np.cos(theta)])
        for name in self.sensor_info.ballquat_names:
            obs[name] = quat2mat(obs[name])
        return obs

    base_agent_cls._init_jnt_sensors = _init_jnt_sensors
    base_agent_cls.obs_sensor = obs_sensor
    base_agent_cls.__cvpo_patched__ = True


# --------------------------------------------------------------------------
# 7. texture files (missing Race textures, oversized skybox)
# --------------------------------------------------------------------------


def _as_list(node: Any) -> list:
    if node is None:
        return []
    return node if isinstance(node, list) else [node]


def fix_texture_files(doc: dict) -> None:
    """Rewrite texture file attributes of a parsed MuJoCo XML (xmltodict form) in place."""
    mujoco_node = doc.get("mujoco") if isinstance(doc, dict) else None
    if not isinstance(mujoco_node, dict):
        return
    compiler = mujoco_node.get("compiler")
    texture_dir = compiler.get("@texturedir", "") if isinstance(compiler, dict) else ""
    asset = mujoco_node.get("asset")
    if not isinstance(asset, dict):
        return
    low_res_skybox = not _textures.use_original_skybox()
    for texture in _as_list(asset.get("texture")):
        if not isinstance(texture, dict):
            continue
        is_skybox = texture.get("@type") == "skybox"
        for key, value in list(texture.items()):
            if not (key.startswith("@file") and isinstance(value, str) and value):
                continue
            path = value if os.path.isabs(value) else os.path.join(texture_dir, value)
            if not os.path.exists(path):
                texture[key] = _textures.generated_texture_path(
                    os.path.splitext(os.path.basename(value))[0]
                )
            elif is_skybox and low_res_skybox:
                texture[key] = _textures.downsampled_texture_path(path)


class _WorldXmlToDict:
    """Replaces the ``xmltodict`` global of ``safety_gymnasium.world`` (only there)."""

    def __init__(self, real: types.ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def unparse(self, doc: Any, *args: Any, **kwargs: Any) -> str:
        fix_texture_files(doc)
        return self._real.unparse(doc, *args, **kwargs)


def _patch_world(world_module: types.ModuleType) -> None:
    current = getattr(world_module, "xmltodict", None)
    if current is None or isinstance(current, _WorldXmlToDict):
        return
    world_module.xmltodict = _WorldXmlToDict(current)


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def safety_gymnasium_available() -> bool:
    """Whether the safety_gymnasium package is installed (does not import it)."""
    return _module_exists("safety_gymnasium")


def import_safety_gymnasium() -> types.ModuleType:
    """Import safety_gymnasium with the fixes above applied; cached after the first call.

    Raises:
        SafetyGymnasiumImportError: not installed, or not importable on this stack.
    """
    global _safety_module
    if _safety_module is not None:
        return _safety_module
    with _lock:
        if _safety_module is not None:
            return _safety_module
        if not safety_gymnasium_available():
            raise SafetyGymnasiumImportError(
                f"safety-gymnasium is not installed; {SAFETY_GYMNASIUM_INSTALL_HINT}"
            )
        aliases: list[str] = []
        original_dataclass = dataclasses.dataclass
        try:
            aliases = _install_aliases()
            _install_multi_agent_stub()
            _render.import_mujoco()  # breakage 10
            dataclasses.dataclass = _make_dataclass_wrapper(original_dataclass)
            module = importlib.import_module("safety_gymnasium")
            # The package __init__ does not import the task classes (gymnasium
            # imports ``safety_gymnasium.builder`` lazily on the first make);
            # import every module that defines such dataclasses now, while the
            # wrapper is in place.
            for name in _EAGER_MODULES:
                importlib.import_module(name)
            base_agent = importlib.import_module("safety_gymnasium.bases.base_agent")
            world = importlib.import_module("safety_gymnasium.world")
            underlying = importlib.import_module("safety_gymnasium.bases.underlying")
        except ImportError as exc:
            raise SafetyGymnasiumImportError(
                f"safety-gymnasium is installed but could not be imported: {exc!r}. "
                f"Reinstall it: {SAFETY_GYMNASIUM_INSTALL_HINT}"
            ) from exc
        except Exception as exc:
            raise SafetyGymnasiumImportError(
                "safety-gymnasium is installed but failed to import on this stack "
                f"(a breakage cvpo.envs._compat does not handle yet): {exc!r}"
            ) from exc
        finally:
            dataclasses.dataclass = original_dataclass
            _remove_aliases(aliases)
        _patch_base_agent(base_agent)
        _patch_world(world)
        _render.patch_underlying(underlying)  # breakage 9
        _safety_module = module
        return module
