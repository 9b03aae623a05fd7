"""Error types raised by :mod:`cvpo.envs` (all re-exported there)."""

from __future__ import annotations

SAFETY_GYMNASIUM_INSTALL_HINT = (
    "run `make install` in the project root, or "
    "`pip install --no-deps safety-gymnasium==1.0.0` plus its runtime needs "
    "(mujoco>=3, xmltodict, pyyaml, imageio, gymnasium-robotics); it must be installed "
    "with --no-deps because its pins (gymnasium==0.28.1, mujoco==2.3.3) conflict with Ray"
)


class UnknownEnvError(ValueError):
    """The environment id is not registered with gymnasium (message lists close matches)."""


class UnsupportedEnvError(ValueError):
    """The id is registered but cvpo.envs cannot serve it (e.g. Safety-Gymnasium Vision ids)."""


class NoCostSignalError(ValueError):
    """The environment does not report ``info["cost"]`` on its steps."""


class NonFiniteSignalError(ValueError):
    """The underlying environment returned a NaN or infinite reward or cost."""


class SafetyGymnasiumImportError(ImportError):
    """safety-gymnasium is missing (or could not be imported) but a Safety id was requested."""
