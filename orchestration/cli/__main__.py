"""`python -m orchestration.cli ...` runs the `layerwise` command (as the tests and a checkout without the
console script do)."""

import sys

from orchestration.cli.main import main

sys.exit(main())
