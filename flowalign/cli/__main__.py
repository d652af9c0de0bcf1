"""``python -m flowalign.cli``."""

import sys

from flowalign.cli import main

sys.exit(main())
