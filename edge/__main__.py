"""``python -m edge`` is ``guardpost``."""

import sys

from edge.tools.cli import main

sys.exit(main())
