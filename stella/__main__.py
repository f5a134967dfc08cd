"""`python -m stella` is the `stella` command."""

import sys

try:
    from stella.cli import main
except KeyboardInterrupt:  # Ctrl-C while it loads: exit 130 and no traceback, as in main()
    sys.exit(130)

sys.exit(main())
