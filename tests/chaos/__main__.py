"""``python -m tests.chaos``: run a fault campaign from the repository root (``make chaos``).

The step functions live in :mod:`tests.chaos.steps`, never in this ``__main__``
module, so they have the same name in every program the campaign starts.
"""

from __future__ import annotations

import sys

from tests.chaos.campaign import main

sys.exit(main())
