"""``python -m edge`` is ``guardpost``."""

import sys

from edge.cli import main

sys.exit(main())
