"""``memaudit watch DIR [CONFIG]``: audit new checkpoints exactly once and compare each with its
predecessor (safe to run from cron or a RayCronJob)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from audit.cli_report import EXIT_GATE_FAILED, location


def add_parser(commands: argparse._SubParsersAction, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    watch = commands.add_parser("watch", help="audit checkpoints not audited yet under DIR, then compare each "
                                              "with the previous one")
    watch.add_argument("folder", type=location,
                       help="folder (or object-store prefix) the training job writes diffusers checkpoints to")
    with_config(watch)
    watch.add_argument("--model", help="model=<name> of the runs (default: the folder's name)")
    watch.add_argument("--address", help="Ray cluster to join: host:port, ray://host:port, or auto for the "
                                         "one `ray start` runs on this machine (default: the config's "
                                         "compute.address, else $RAY_ADDRESS, else a private local Ray, "
                                         "even when a cluster runs here)")
    watch.add_argument("--fail-if-new-memorized", action="store_true",
                       help=f"exit {EXIT_GATE_FAILED} if a new checkpoint memorizes a prompt its predecessor did not")
    watch.add_argument("--max-rate-increase", type=float, metavar="DELTA",
                       help=f"exit {EXIT_GATE_FAILED} if the flagged-prompt rate rises by more than DELTA")


def run(args: argparse.Namespace) -> int:
    from audit.watch import watch

    report = watch(args.folder, args.config, args.overrides, args.model, args.address,
                   args.fail_if_new_memorized, args.max_rate_increase)
    print(f"watch: {len(report.audited)} audited now, {len(report.skipped_done)} already audited, "
          f"{len(report.skipped_locked)} being audited elsewhere, {len(report.failed)} failed")
    for name, summary in report.compared.items():
        print(f"compare {summary['previous']} -> {name}: {summary['newly_memorized']} newly memorized, "
              f"{summary['no_longer_memorized']} no longer; {summary['compare']}")
    if report.failed:
        first = next(iter(report.failed.items()))
        print(f"memaudit: {len(report.failed)} checkpoints failed (e.g. {first[0]}: {first[1]}); the next watch "
              "retries them", file=sys.stderr)
        return 1
    if report.gate_failures:
        for name, reasons in report.gate_failures.items():
            print(f"memaudit: release gate failed for {name}: {'; '.join(reasons)}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0
