"""`python -m mmdlm.commands SUBCOMMAND ...`: the same as the `mmdlm` command."""

import sys

from mmdlm.commands import main

sys.exit(main())
