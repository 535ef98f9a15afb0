"""Ray Jobs entrypoint for the report of a finished run (it needs no workers: it runs on the
node that runs the job).

    ray job submit --address http://HEAD:8265 --submission-id report-<run> -- \\
        python jobs/report.py /runs/model=sd15/checkpoint=abc/run=def

Writes RUN/report/ (index.html, summary.json, plots); re-submitting rewrites it from the tables.
"""

from __future__ import annotations

import sys

from audit.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
