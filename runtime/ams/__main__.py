"""``python -m runtime.ams``: see `runtime.ams.cli`."""

import sys

from runtime.ams.cli import main

if __name__ == "__main__":
    sys.exit(main())
