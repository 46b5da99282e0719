"""`python -m qformer ...` is the `qformer` command (what `accelerate launch -m qformer` runs)."""

import sys

from qformer.cli import main

sys.exit(main())
