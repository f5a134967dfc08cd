"""`python -m stella` is the `stella` command."""

import sys

from stella.cli import main

sys.exit(main())
