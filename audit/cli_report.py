"""``memaudit report RUN``, ``memaudit compare RUN_A RUN_B [gate options]`` and ``memaudit verify RUN``."""

from __future__ import annotations

import argparse
import sys

from audit.location import Location

EXIT_GATE_FAILED = 4
EXIT_VERIFY_FAILED = 5


def location(text: str) -> Location:
    """A command-line folder or file: a path, or an object-store URI."""
    return Location.of(text)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="write RUN/report/index.html, summary.json and plots")
    report.add_argument("run", type=location, help="run folder (<root>/model=…/checkpoint=…/run=…)")
    report.add_argument("--gallery", type=int, default=24, help="verified pairs shown (default 24)")
    verify = commands.add_parser("verify", help="reconcile a run with its plan: every sample once, markers vs files")
    verify.add_argument("run", type=location, help="run folder")
    verify.add_argument("--json", action="store_true", help="print the findings as JSON")
    compare = commands.add_parser("compare", help="compare two runs (e.g. two checkpoints); a release gate")
    compare.add_argument("run_a", type=location, help="the earlier run (baseline)")
    compare.add_argument("run_b", type=location, help="the later run (candidate)")
    compare.add_argument("--out", type=location, help="output folder (default: RUN_B/compare/vs-<run A>)")
    compare.add_argument("--fail-if-new-memorized", action="store_true",
                         help=f"exit {EXIT_GATE_FAILED} if any prompt is flagged in B but not in A")
    compare.add_argument("--max-rate-increase", type=float, metavar="DELTA",
                         help=f"exit {EXIT_GATE_FAILED} if the flagged-prompt rate rises by more than DELTA (e.g. 0.01)")
    compare.add_argument("--allow-different-calibration", action="store_true",
                         help="compare runs detected with different thresholds or calibrations (refused otherwise)")


def run(args: argparse.Namespace) -> int:
    if args.command == "verify":
        return _verify(args)
    if args.command == "report":
        from audit.report.build import write_report

        _note_writer(args.run)
        path = write_report(args.run, gallery_size=args.gallery)
        print(f"report: {path}")
        return 0
    from audit.report.compare import compare_runs, default_out, gate, write_compare

    result = compare_runs(args.run_a, args.run_b, args.allow_different_calibration)
    path = write_compare(result, args.out or default_out(args.run_b, result))
    rates = result["rates"]["flagged_prompts"]
    print(f"compare: {path}")
    print(f"flagged prompts: {rates['a']['count']}/{rates['a']['of']} -> {rates['b']['count']}/{rates['b']['of']} "
          f"({100 * rates['delta']:+.1f} pts); newly memorized {len(result['newly_memorized'])}, no longer "
          f"memorized {len(result['no_longer_memorized'])}, in both {len(result['still_memorized'])}")
    reasons = gate(result, args.fail_if_new_memorized, args.max_rate_increase)
    if reasons:
        print(f"memaudit: release gate failed: {'; '.join(reasons)}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


def _note_writer(run: Location) -> None:
    """Readers take no lease and never wait for one; they say when a driver is still writing the
    run (what they read is then the shards complete so far)."""
    from audit.lease import describe, holder

    record = holder(run)
    if record is not None:
        print(f"note: {run} is being written now by {describe(record)}; this reads the shards complete so far",
              file=sys.stderr)


def _verify(args: argparse.Namespace) -> int:
    import json

    from audit.reconcile import verify_run

    _note_writer(args.run)
    result = verify_run(args.run)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"verify: {result.present_samples} of {result.planned_samples} planned samples present in "
              f"{result.complete_shards} of {result.planned_shards} complete shards; "
              f"{'OK' if result.ok else f'{len(result.problems)} problems'}")
        for line in result.problems:
            print(f"problem: {line}")
        for line in result.notes:
            print(f"note: {line}")
    return 0 if result.ok else EXIT_VERIFY_FAILED
