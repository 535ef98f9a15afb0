"""Ray Jobs entrypoint for scheduled audits: every checkpoint under a folder (or object-store
prefix) not audited yet is audited once on the job's cluster, then compared with the previous
checkpoint of its model.

    ray job submit --address http://HEAD:8265 -- \\
        python jobs/watch.py /checkpoints/sd-finetune CONFIG --set run.root=/runs [--fail-if-new-memorized]
    ray job submit --address http://HEAD:8265 -- \\
        python jobs/watch.py s3://ckpts/sd-finetune CONFIG --set run.root=s3://audits/runs

Safe to submit on a schedule (cron, a Kubernetes CronJob): finished checkpoints are skipped
without touching the cluster, and a checkpoint another invocation is auditing is left to it.
"""

from __future__ import annotations

import sys

from audit.cli import main

if __name__ == "__main__":
    sys.exit(main(["watch", *sys.argv[1:]]))
