"""``python -m lens_rl SUBCOMMAND ...``: the same as the ``lens-rl`` console script."""

import sys

from lens_rl.cli import main

if __name__ == "__main__":
    sys.exit(main())
