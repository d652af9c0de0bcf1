"""``python -m flowalign``: the ``flowalign`` command line."""

import sys

from flowalign.cli import main

sys.exit(main())
