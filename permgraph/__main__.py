"""``python -m permgraph``: the command line."""

import sys

from permgraph.cli import main

sys.exit(main())
