"""Ray Jobs entrypoint for the reference side: ``memaudit reference ACTION ...`` on the job's cluster.

    ray job submit --address http://HEAD:8265 --submission-id ref-embed-laion-part1 \\
        --working-dir . -- python jobs/reference.py embed /data/img2dataset-out /data/ref CONFIG
    ray job submit ... -- python jobs/reference.py index /data/ref CONFIG

Inside a Ray job ``RAY_ADDRESS`` is set, so embedding actors start on the job's cluster.
Re-submitting resumes: embedded shards (and built index shards) are skipped.
"""

from __future__ import annotations

import sys

from audit.cli import main

if __name__ == "__main__":
    sys.exit(main(["reference", *sys.argv[1:]]))
