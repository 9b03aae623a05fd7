"""Constrained environments for CVPO on the modern stack (gymnasium 1.x, numpy 2).

Public API
----------
``make_env(env_id, *, on_nonfinite="raise", max_episode_steps=None,
disable_env_checker=True, **kwargs) -> gymnasium.Env``
    Every env it returns has the gymnasium 5-tuple ``step``, the task's
    episode time limit (``gymnasium.wrappers.TimeLimit``; ``env.spec``
    carries ``max_episode_steps``), a float32 Box observation space when the
    env's observations are a Box (observations are float32 arrays inside it),
    and ``info["cost"]``: a finite python float on every step (the sum of the
    task's cost terms; >= 0 for Safety-Gymnasium and cvpo tasks).

    * Safety-Gymnasium ids (``list_safety_gymnasium_ids()``): built from
      ``gymnasium.spec(id)`` through the compatibility layer
      (:mod:`cvpo.envs._compat`), their 6-tuple converted. Their ``cost_*``
      entries (``cost_hazards``, ``cost_vases_contact``, ..., and upstream's
      ``cost_sum``) stay in ``info``; ``info["cost"]`` is authoritative.
      ``...Gymnasium-v0`` aliases map to the plain id; Vision and Debug ids
      raise :class:`UnsupportedEnvError`.
    * ``cvpo/PointHazard-v0`` (:data:`POINT_HAZARD_ID`): the tiny task of
      :mod:`cvpo.envs.point_hazard`; ``info`` has ``cost``, ``cost_hazard``
      and ``goal_reached``.
    * Any other registered gymnasium id whose env already reports
      ``info["cost"]``. ``make_env`` checks this by calling ``reset()`` and one
      ``step()`` with a sampled action on the new env (so call ``reset()``
      before using it, as always); an env without it raises
      :class:`NoCostSignalError`, and so does any later step that lacks it.
      Box observations are cast to float32. Negative costs are not rejected.

    ``on_nonfinite``: a NaN/inf reward or cost from the underlying env raises
    :class:`NonFiniteSignalError` (``"raise"``, default; it names the env id,
    the 0-based step index within the episode and the signal, also available
    as ``.env_id``, ``.step``, ``.signals``). With ``"drop"`` the value is
    replaced by 0.0, ``info["nonfinite"] = True`` (and
    ``info["nonfinite_signals"]``) is set, the step returns
    ``truncated=True``, and a RuntimeWarning is emitted once per env.

    ``max_episode_steps`` overrides the registered horizon;
    ``disable_env_checker`` is passed to ``gymnasium.make`` for third-party
    ids (Safety and cvpo ids never get gymnasium's PassiveEnvChecker or
    OrderEnforcing, which only cost time here). Other ``kwargs`` go to the
    env constructor.

``episode_horizon(env) -> int``
    The env's ``max_episode_steps``.
``can_terminate_early(env_id) -> bool``
    Whether an episode may end (``terminated=True``) before the time limit.
``list_safety_gymnasium_ids(include_race=True) -> list[str]``
    The 122 single-agent, non-Vision, non-Debug Safety-Gymnasium ids (107
    without the 15 ``Race`` ones).
``is_safety_gymnasium_id(env_id) -> bool``

Errors (all ``ValueError`` subclasses, except the ImportError):
:class:`UnknownEnvError` (close matches in the message and ``.suggestions``),
:class:`UnsupportedEnvError`, :class:`NoCostSignalError`,
:class:`NonFiniteSignalError`, :class:`SafetyGymnasiumImportError`
(``ImportError``; says to run ``make install`` or
``pip install --no-deps safety-gymnasium==1.0.0``).

Importing this package does not import safety_gymnasium (that happens on the
first Safety id), so it works without safety-gymnasium installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import warnings

import gymnasium
from gymnasium.envs.registration import EnvSpec, load_env_creator
from gymnasium.wrappers import TimeLimit

from cvpo.envs import _compat
from cvpo.envs._errors import (
    NoCostSignalError,
    NonFiniteSignalError,
    SafetyGymnasiumImportError,
    UnknownEnvError,
    UnsupportedEnvError,
)
from cvpo.envs._wrappers import ON_NONFINITE_MODES, CostInfoWrapper, SafetyGymnasiumAdapter

__all__ = [
    "POINT_HAZARD_ID",
    "NoCostSignalError",
    "NonFiniteSignalError",
    "SafetyGymnasiumImportError",
    "UnknownEnvError",
    "UnsupportedEnvError",
    "can_terminate_early",
    "episode_horizon",
    "is_safety_gymnasium_id",
    "list_safety_gymnasium_ids",
    "make_env",
]

POINT_HAZARD_ID = "cvpo/PointHazard-v0"

_SAFETY_ID_RE = re.compile(r"^Safety[A-Za-z0-9]+-v\d+$")
_SAFETY_NAV_RE = re.compile(
    r"^Safety(?P<agent>Point|Car|Doggo|Racecar|Ant)"
    r"(?P<task>(?:Goal|Button|Push|Circle|Run|Race|FadingEasy|FadingHard)\d+)"
    r"(?P<variant>Vision|Debug|Gymnasium)?-v(?P<version>\d+)$"
)
_SAFETY_VELOCITY_RE = re.compile(
    r"^Safety(?P<robot>[A-Za-z0-9]+?)Velocity(?P<variant>Gymnasium)?-v(?P<version>\d+)$"
)
# Velocity tasks whose gymnasium base env has a "healthy" check that terminates.
_VELOCITY_NEVER_TERMINATE = {"HalfCheetah", "Swimmer"}


def _register_cvpo_envs() -> None:
    if POINT_HAZARD_ID not in gymnasium.envs.registry:
        gymnasium.register(
            id=POINT_HAZARD_ID,
            entry_point="cvpo.envs.point_hazard:PointHazardEnv",
            max_episode_steps=100,
            disable_env_checker=True,
            order_enforce=False,
        )


_register_cvpo_envs()


# --------------------------------------------------------------------------
# id bookkeeping
# --------------------------------------------------------------------------


def is_safety_gymnasium_id(env_id: str) -> bool:
    """Whether ``env_id`` names a Safety-Gymnasium task (by its form; no import)."""
    return bool(_SAFETY_ID_RE.match(env_id))


def _is_race(env_id: str) -> bool:
    match = _SAFETY_NAV_RE.match(env_id)
    return bool(match and match.group("task").startswith("Race"))


def list_safety_gymnasium_ids(include_race: bool = True) -> list[str]:
    """Single-agent Safety-Gymnasium ids that :func:`make_env` serves, sorted.

    Enumerated from ``gymnasium.envs.registry`` after importing safety_gymnasium:
    the ids whose entry point is in ``safety_gymnasium`` (which excludes the
    ``...Gymnasium-v0`` conversion aliases), minus Vision and Debug variants.
    safety-gymnasium registers no multi-agent ids in the registry (those are
    built by ``safety_gymnasium.make_ma``); any multi-agent entry point is
    excluded anyway. 122 ids, 107 without ``Race``.
    """
    _compat.import_safety_gymnasium()
    ids = []
    for env_id, spec in gymnasium.envs.registry.items():
        entry_point = spec.entry_point if isinstance(spec.entry_point, str) else ""
        if not entry_point.startswith("safety_gymnasium."):
            continue
        if "gymnasium_conversion" in entry_point or "multi_agent" in entry_point:
            continue
        if "Multi" in env_id or env_id.lower().startswith("ma_"):
            continue
        nav = _SAFETY_NAV_RE.match(env_id)
        vel = _SAFETY_VELOCITY_RE.match(env_id)
        if not (nav or vel) or (nav or vel).group("variant"):
            continue
        if not include_race and _is_race(env_id):
            continue
        ids.append(env_id)
    return sorted(ids)


def can_terminate_early(env_id: str) -> bool:
    """Best-effort: may an episode of ``env_id`` end with ``terminated=True`` before its limit?

    * ``cvpo/PointHazard-v0``: False.
    * Safety velocity tasks: True for Hopper, Walker2d, Ant, Humanoid (they end
      when unhealthy), False for HalfCheetah and Swimmer.
    * Safety navigation tasks: True for ``Race`` (the episode ends when the
      goal is reached: ``continue_goal=False``) and for every ``Ant`` agent
      (ends when the body touches the ground); False otherwise (Goal, Button,
      Push, Circle, Run, Fading with Point/Car/Doggo/Racecar). Strictly,
      Goal/Button/Push end when re-placing the goal fails, which needs a
      pathologically crowded layout; we ignore that.
    * Anything else: True (unknown, so no fixed-horizon guarantee).
    """
    if env_id == POINT_HAZARD_ID:
        return False
    nav = _SAFETY_NAV_RE.match(env_id)
    if nav:
        return nav.group("task").startswith("Race") or nav.group("agent") == "Ant"
    vel = _SAFETY_VELOCITY_RE.match(env_id)
    if vel:
        return vel.group("robot") not in _VELOCITY_NEVER_TERMINATE
    return True


def episode_horizon(env: gymnasium.Env) -> int:
    """``max_episode_steps`` of an env made by :func:`make_env` (or any TimeLimit-ed env)."""
    spec = getattr(env, "spec", None)
    if spec is not None and spec.max_episode_steps:
        return int(spec.max_episode_steps)
    inner = env
    while inner is not None:
        if isinstance(inner, TimeLimit):
            return int(inner._max_episode_steps)
        inner = getattr(inner, "env", None)
    raise ValueError(f"{env!r} has no episode time limit (no spec.max_episode_steps, no TimeLimit)")


def _unknown(env_id: str) -> UnknownEnvError:
    if _compat.safety_gymnasium_available():
        try:
            _compat.import_safety_gymnasium()  # so that its ids are among the suggestions
        except ImportError:
            pass
    candidates = list(gymnasium.envs.registry.keys())
    suggestions = difflib.get_close_matches(env_id, candidates, n=5, cutoff=0.6)
    if not suggestions:
        lowered = {c.lower(): c for c in candidates}
        suggestions = [
            lowered[m]
            for m in difflib.get_close_matches(env_id.lower(), list(lowered), n=5, cutoff=0.5)
        ]
    hint = (
        f" Did you mean: {', '.join(suggestions)}?"
        if suggestions
        else f" See cvpo.envs.list_safety_gymnasium_ids() and {POINT_HAZARD_ID!r}."
    )
    error = UnknownEnvError(
        f"Unknown environment id {env_id!r}: not registered with gymnasium.{hint}"
    )
    error.suggestions = suggestions
    return error


def _lookup_spec(env_id: str) -> EnvSpec:
    spec = gymnasium.envs.registry.get(env_id)
    if spec is None and ":" in env_id:
        # gymnasium's "package.module:Env-v0" form: import the module, which registers the id.
        module_name, _, bare_id = env_id.partition(":")
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownEnvError(
                f"{env_id!r}: cannot import module {module_name!r}: {exc}"
            ) from exc
        env_id = bare_id
        spec = gymnasium.envs.registry.get(env_id)
    if spec is None:
        raise _unknown(env_id)
    return spec


def _instantiate(spec: EnvSpec, kwargs: dict, max_episode_steps: int | None) -> gymnasium.Env:
    """Build the bare env from its spec (no PassiveEnvChecker, no OrderEnforcing)."""
    merged = {**spec.kwargs, **kwargs}
    env = load_env_creator(spec.entry_point)(**merged)
    horizon = max_episode_steps if max_episode_steps is not None else spec.max_episode_steps
    env.unwrapped.spec = dataclasses.replace(spec, kwargs=merged, max_episode_steps=horizon)
    return env


def _check_horizon(env_id: str, horizon: int | None) -> int:
    if horizon is None or int(horizon) <= 0:
        raise ValueError(
            f"{env_id} has no episode time limit; pass max_episode_steps=... to make_env"
        )
    return int(horizon)


# --------------------------------------------------------------------------
# make_env
# --------------------------------------------------------------------------


def make_env(
    env_id: str,
    *,
    on_nonfinite: str = "raise",
    max_episode_steps: int | None = None,
    disable_env_checker: bool = True,
    **kwargs,
) -> gymnasium.Env:
    """Make a constrained env with the contract described in the module docstring."""
    if on_nonfinite not in ON_NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE_MODES}, got {on_nonfinite!r}")
    if is_safety_gymnasium_id(env_id):
        return _make_safety(env_id, on_nonfinite, max_episode_steps, kwargs)

    spec = _lookup_spec(env_id)
    env_id = spec.id
    if spec.namespace == "cvpo":
        env = _instantiate(spec, kwargs, max_episode_steps)
        horizon = _check_horizon(env_id, env.spec.max_episode_steps)
        return TimeLimit(CostInfoWrapper(env, env_id, on_nonfinite), horizon)

    env = gymnasium.make(
        env_id,
        max_episode_steps=max_episode_steps,
        disable_env_checker=disable_env_checker,
        **kwargs,
    )
    wrapped = CostInfoWrapper(env, env_id, on_nonfinite)
    try:
        # The cost-signal probe: reset + one step (see the module docstring).
        wrapped.reset()
        wrapped.step(wrapped.action_space.sample())
    except BaseException:
        wrapped.close()
        raise
    if _horizon_or_none(wrapped) is None:
        wrapped.close()
        _check_horizon(env_id, None)
    return wrapped


def _horizon_or_none(env: gymnasium.Env) -> int | None:
    try:
        return episode_horizon(env)
    except ValueError:
        return None


def _make_safety(
    env_id: str, on_nonfinite: str, max_episode_steps: int | None, kwargs: dict
) -> gymnasium.Env:
    _compat.import_safety_gymnasium()  # raises SafetyGymnasiumImportError with the install hint
    nav = _SAFETY_NAV_RE.match(env_id)
    vel = _SAFETY_VELOCITY_RE.match(env_id)
    variant = (nav or vel).group("variant") if (nav or vel) else None
    if variant in ("Vision", "Debug"):
        raise UnsupportedEnvError(
            f"{env_id}: Safety-Gymnasium {variant} variants are not supported by cvpo.envs "
            "(image observations / keyboard control); use the plain id "
            f"{env_id.replace(variant, '')!r}"
        )
    if variant == "Gymnasium":
        # The ...Gymnasium-v0 ids only wrap the plain task into the 5-tuple API
        # through safety_gymnasium.make, which is broken on gymnasium 1.x; we do
        # that conversion ourselves.
        env_id = env_id.replace("Gymnasium-", "-")
    spec = gymnasium.envs.registry.get(env_id)
    if (
        spec is None
        or not isinstance(spec.entry_point, str)
        or not spec.entry_point.startswith("safety_gymnasium.")
    ):
        raise _unknown(env_id)
    with warnings.catch_warnings():
        # gymnasium's Box compares float32 bounds against float64's range when
        # an agent builds its float64 action space; numpy warns about the cast.
        warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)
        env = _instantiate(spec, kwargs, max_episode_steps)
    horizon = _check_horizon(env_id, env.spec.max_episode_steps)
    task = getattr(env.unwrapped, "task", None)
    if max_episode_steps is not None and task is not None and hasattr(task, "num_steps"):
        task.num_steps = horizon  # navigation tasks also truncate internally at num_steps
    return TimeLimit(SafetyGymnasiumAdapter(env, env_id, on_nonfinite), horizon)
