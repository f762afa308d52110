"""``python -m flashmemory``: the same command line as the ``flashmemory`` script."""

from __future__ import annotations

import sys

from flashmemory.cli import main

sys.exit(main())
