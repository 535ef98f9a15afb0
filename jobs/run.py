"""Ray Jobs entrypoint for a full audit run: generation, embeddings, kNN join, detection, report.

(Not named audit.py: a script beside it named like the package would shadow ``audit``.)

    ray job submit --address http://HEAD:8265 --submission-id audit-<id> \
        --working-dir . -- python jobs/run.py CONFIG [--set KEY=VALUE ...] [--retry-failed]

Inside a Ray job ``RAY_ADDRESS`` is set, so the run joins the job's cluster. Re-submitting the same
config resumes the same run (its id is the hash of what determines its samples): finished shards
are skipped and every planned sample ends up exactly once.
"""

from __future__ import annotations

import sys

from audit.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
