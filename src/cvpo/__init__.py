"""CVPO core: Ray-free math and environment plumbing."""

__version__ = "0.1.0"


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
