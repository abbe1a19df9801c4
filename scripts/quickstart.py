"""Quickstart on the embedded default: everything offline, on CPU, in minutes.

Run with ``make demo``. The stages grow as the toolkit does; see README.md.
"""

from __future__ import annotations

import sys

from lens_rl.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
