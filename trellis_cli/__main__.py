"""`python -m trellis_cli ARGS` runs the `trellis` command (tests and benchmarks start it this way)."""

import sys

from trellis_cli.cli import main

sys.exit(main())
