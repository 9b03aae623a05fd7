"""RLlib integration for CVPO (and its SAC-Lagrangian baseline, SACLag).

Importing this package registers the algorithms "CVPO" and "SACLag" with Ray
Tune (so ``tune.Tuner("CVPO", ...)`` and YAML experiment files find them) and
every env id that :func:`cvpo.envs.make_env` accepts.
"""


import ray  # noqa: E402
from ray.tune.registry import register_trainable  # noqa: E402

import cvpo  # noqa: E402,F401  (drops third-party import banners first)
from rllib_ext.cvpo import CVPO, CVPOConfig  # noqa: E402
from rllib_ext.envs import register_all  # noqa: E402
from rllib_ext.sac_lag import SACLag, SACLagConfig  # noqa: E402


def register() -> None:
    """(Re-)registers "CVPO", "SACLag" and the env ids with Tune's registry."""
    register_trainable("CVPO", CVPO)
    register_trainable("SACLag", SACLag)
    register_all(force=True)


register()
# Tune writes registrations into the running Ray once; a later ray.init() in
# the same process (tests, notebooks) starts without them, so register again.
ray._private.worker._post_init_hooks.append(register)

__all__ = ["CVPO", "CVPOConfig", "SACLag", "SACLagConfig", "register"]
