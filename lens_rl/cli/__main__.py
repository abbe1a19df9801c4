"""``python -m lens_rl.cli SUBCOMMAND ...`` (what ``accelerate launch -m lens_rl.cli`` runs)."""

import sys

from lens_rl.cli import main
from lens_rl.utils.launch import end_process_group

if __name__ == "__main__":
    rc = main()
    if rc == 0:  # every rank done before the group goes (a failed rank would leave the others waiting)
        end_process_group()
    sys.exit(rc)
