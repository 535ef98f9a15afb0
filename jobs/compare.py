"""Ray Jobs entrypoint comparing two runs, usable as a release gate (the job fails, exit 4, when a
gate given here fails).

    ray job submit --address http://HEAD:8265 --submission-id compare-<a>-<b> -- \\
        python jobs/compare.py RUN_A RUN_B --fail-if-new-memorized
"""

from __future__ import annotations

import sys

from audit.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
