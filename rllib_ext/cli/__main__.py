"""``python -m rllib_ext.cli``: the ``rllib`` command without its console script."""

import sys

from rllib_ext.cli import main

sys.exit(main())
