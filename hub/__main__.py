"""``python -m hub`` is the ``hub`` command."""

import sys

from .cli import main

sys.exit(main())
