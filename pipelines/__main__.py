"""``python -m pipelines``: the ``gradmimic`` command (for a job's working directory, where no script is installed)."""

import sys

from pipelines.ops.cli import main

sys.exit(main())
