"""``python -m beamloop.edge.cli``: the ``beamloop`` command."""

import sys

from beamloop.edge.cli import main

sys.exit(main())
