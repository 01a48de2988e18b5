"""`python -m ternpool.cluster.cli`: the `ternpool` console script."""

import sys

from . import main

sys.exit(main())
