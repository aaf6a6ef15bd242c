"""``python -m snapperable ...``: the command line of ``snapperable.cli``."""

import sys

from snapperable.cli import main

sys.exit(main())
