"""``python -m lens_rl.cli SUBCOMMAND ...`` (what ``accelerate launch -m lens_rl.cli`` runs)."""

import sys

from lens_rl.cli import main

if __name__ == "__main__":
    sys.exit(main())
