"""RLlib integration for CVPO (and its SAC-Lagrangian baseline, SACLag).

Importing this package registers the algorithms "CVPO" and "SACLag" with Ray
Tune (so ``tune.Tuner("CVPO", ...)`` and YAML experiment files find them) and
every env id that :func:`cvpo.envs.make_env` accepts.
"""

from ray.tune.registry import register_trainable  # noqa: E402

import cvpo  # noqa: E402,F401  (drops third-party import banners first)
from rllib_ext.cvpo import CVPO, CVPOConfig  # noqa: E402
from rllib_ext.envs import register_all  # noqa: E402
from rllib_ext.sac_lag import SACLag, SACLagConfig  # noqa: E402


def register() -> None:
    """(Re-)registers "CVPO", "SACLag" and the env ids with Tune's registry.

    Runs at import. Tune keeps registrations in the running Ray session, so after a
    ``ray.shutdown()`` and a new ``ray.init()`` in the same process call it again
    before ``tune.Tuner("CVPO", ...)`` by name (building an algorithm registers the
    env ids by itself)."""
    register_trainable("CVPO", CVPO)
    register_trainable("SACLag", SACLag)
    register_all()


register()

__all__ = ["CVPO", "CVPOConfig", "SACLag", "SACLagConfig", "register"]
