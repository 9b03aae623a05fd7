"""RLlib integration for CVPO.

Importing this package registers the algorithm "CVPO" with Ray Tune (so
``tune.Tuner("CVPO", ...)`` and YAML experiment files find it) and every env
id that :func:`cvpo.envs.make_env` accepts.
"""


def _silence_import_banners() -> None:
    """Drops gymnasium-robotics' AdroitHand notice before anything imports it.

    gymnasium_robotics (imported by safety-gymnasium for its multi-agent tasks)
    prints a Farama notification about the AdroitHand v1 reward functions on
    import, so every ``rllib`` command, ``--help`` included, printed it. We use
    no Adroit task; only that notification entry is removed (nothing is
    redirected, so real import errors and warnings still show).
    """
    try:
        from farama_notifications import notifications
    except Exception:  # noqa: BLE001 (not installed: nothing is printed either)
        return
    robotics = notifications.get("gymnasium_robotics")
    if isinstance(robotics, dict):
        for version, text in list(robotics.items()):
            if isinstance(text, str) and text.startswith("AdroitHand"):
                del robotics[version]


_silence_import_banners()

import ray  # noqa: E402
from ray.tune.registry import register_trainable  # noqa: E402

from rllib_ext.cvpo import CVPO, CVPOConfig  # noqa: E402
from rllib_ext.envs import register_all  # noqa: E402


def register() -> None:
    """(Re-)registers "CVPO" and the env ids with Tune's registry."""
    register_trainable("CVPO", CVPO)
    register_all(force=True)


register()
# Tune writes registrations into the running Ray once; a later ray.init() in
# the same process (tests, notebooks) starts without them, so register again.
ray._private.worker._post_init_hooks.append(register)

__all__ = ["CVPO", "CVPOConfig", "register"]
