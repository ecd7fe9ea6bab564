"""`python -m mmdlm SUBCOMMAND ...`: the same as the `mmdlm` command (`mmdlm.commands`)."""

import sys

from mmdlm.commands import main

sys.exit(main())
