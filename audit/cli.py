"""The ``memaudit`` command. ``main(argv)`` is callable from tests and returns the exit code.

Exit codes: 0 done; 1 a failure the run could not recover from, e.g. a full or read-only disk
(finished shards are kept, re-run to resume); 2 bad input (one line on stderr says what and
where); 3 the run finished but some samples have status ``error`` (re-run with
``--retry-failed``); 4 a release gate of ``compare`` or ``watch`` failed; 5 ``verify`` found
problems; 6 another driver holds the folder's lease (or took it over from this one), see
:mod:`audit.lease`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from audit import __version__, layout
from audit.config import dump_config, load_config
from audit.errors import MemauditError, StorageError, storage_error
from audit.lease import LeaseHeld, LeaseLost

log = logging.getLogger("audit")
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_LEASE = 0, 1, 2, 3, 6
WAIT_HELP = "when another driver is writing the same folder, wait for it and then resume (default: exit 6)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memaudit", description="Audit text-to-image diffusion models for training-data memorization."
    )
    parser.add_argument("--version", action="version", version=f"memaudit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", nargs="?", type=Path, help="YAML config (default: the built-in default audit)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set generation.steps=25 (repeatable)")

    run = commands.add_parser("run", help="run (or resume) an audit")
    with_config(run)
    run.add_argument("--address", help="Ray cluster to join: host:port, ray://host:port, or auto for the "
                                       "one `ray start` runs on this machine (default: the config's "
                                       "compute.address, else $RAY_ADDRESS, else a private local Ray, "
                                       "even when a cluster runs here)")
    run.add_argument("--retry-failed", action="store_true", help="also redo samples whose status is an error")
    run.add_argument("--no-report", action="store_true", help="skip writing RUN/report/ at the end")
    run.add_argument("--wait", action="store_true", help=WAIT_HELP)
    run.add_argument("--force", action="store_true",
                     help="a run folder made with other settings is renamed aside (nothing deleted) and started again")

    screen = commands.add_parser("screen", help="screen every prompt for a few denoiser calls and decide which go on "
                                                "to the full audit (docs/screening.md); generates nothing")
    with_config(screen)
    screen.add_argument("--address", help="Ray cluster to join: host:port, ray://host:port, or auto for the "
                                          "one `ray start` runs on this machine (default: the config's "
                                          "compute.address, else $RAY_ADDRESS, else a private local Ray, "
                                          "even when a cluster runs here)")
    screen.add_argument("--force", action="store_true",
                        help="a run folder made with other settings is renamed aside (nothing deleted) and started again")
    screen.add_argument("--wait", action="store_true", help=WAIT_HELP)

    show = commands.add_parser("config", help="validate a config and print it with every default")
    with_config(show)

    from audit import cli_reference, cli_report, cli_serve, cli_watch

    cli_reference.add_parser(commands, with_config)
    cli_report.add_parsers(commands)
    cli_watch.add_parser(commands, with_config)
    cli_serve.add_parser(commands, with_config)

    testbed = commands.add_parser("testbed", help="the trained testbed and architectures for tests/benchmarks")
    actions = testbed.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="save a pipeline with random weights (safetensors)")
    build.add_argument("out", type=Path, help="output folder")
    build.add_argument("--arch", choices=["tiny", "testbed", "sd15", "sd2", "sdxl", "sd3", "flux", "pixart"],
                       default="tiny",
                       help="tiny (tests), testbed (untrained), sd15 (full SD1.5 architecture), or a tiny "
                            "pipeline of another family: sd2, sdxl, sd3, flux, pixart (32 px; flux needs "
                            "height/width passed, multiples of 4)")
    build.add_argument("--seed", type=int, default=0)
    train = actions.add_parser("train", help="train the memorizing testbed and write its folder and model card")
    train.add_argument("out", type=Path, help="output folder (new or empty)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--kind", choices=["glyphs", "maps"], default="glyphs",
                       help="glyphs (builtin:testbed: scikit-learn photos with digits, PNDM) or maps "
                            "(builtin:testbed-maps: matplotlib's sample data, near-flat images, DDIM)")
    train.add_argument("--vae-steps", type=int, default=None)
    train.add_argument("--unet-steps", type=int, default=None)
    train.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    lora = actions.add_parser("train-lora", help="fine-tune a LoRA adapter of builtin:testbed on a small set with "
                                                 "planted duplicates; write its folder and model card")
    lora.add_argument("out", type=Path, help="output folder (new or empty)")
    lora.add_argument("--seed", type=int, default=None, help="the fine-tuning set's and the training's (default 1; "
                                                               "the base testbed's dataset is seed 0)")
    lora.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped testbed's)")
    lora.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    evaluate = actions.add_parser("evaluate", help="re-measure a trained testbed's memorization")
    evaluate.add_argument("folder", type=Path, nargs="?", help="testbed folder (default: the built-in one)")
    evaluate.add_argument("--write", metavar="COMMAND",
                          help="also rewrite metrics.json, examples.png and the model card from this "
                               "measurement, recording COMMAND as the command that trained it")
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from audit.redact import RedactingFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    for noisy in ("diffusers", "transformers", "urllib3", "filelock", "faiss", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        if args.command == "config":
            print(dump_config(load_config(args.config, args.overrides)), end="")
            return EXIT_OK
        if args.command == "testbed":
            return _testbed(args)
        if args.command == "serve":
            from audit import cli_serve

            return cli_serve.run(args)
        if args.command == "watch":
            from audit import cli_watch

            return cli_watch.run(args)
        if args.command in {"report", "compare", "verify"}:
            from audit import cli_report

            return cli_report.run(args)
        if args.command == "reference":
            from audit import cli_reference

            needs_config = args.action != "validate"
            return cli_reference.run(args, load_config(args.config, args.overrides) if needs_config else None)
        if args.command == "screen":
            return _screen(args)
        return _run(args)
    except StorageError as exc:
        print(f"memaudit: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (LeaseHeld, LeaseLost) as exc:
        print(f"memaudit: error: {exc}", file=sys.stderr)
        return EXIT_LEASE
    except MemauditError as exc:
        print(f"memaudit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("memaudit: interrupted; finished shards are kept, run again to resume", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - report, keep finished work, exit non-zero
        refused = storage_error(exc)
        if refused is not None:
            print(f"memaudit: error: {refused}", file=sys.stderr)
            return EXIT_FAILURE
        log.exception("failed")
        print(f"memaudit: failed: {type(exc).__name__}: {exc}; finished shards are kept, "
              "run again to resume", file=sys.stderr)
        return EXIT_FAILURE


def _testbed(args: argparse.Namespace) -> int:
    if args.action == "build":
        from audit.testbed.architectures import ARCHITECTURES, build_pipeline, save_pipeline
        from audit.testbed.families import FAMILIES, build_family

        if args.out.exists() and any(args.out.iterdir()):
            raise MemauditError(f"{args.out}: folder exists and is not empty; choose a new folder")
        if args.arch in FAMILIES:
            pipe = build_family(args.arch, seed=args.seed)
        else:
            pipe = build_pipeline(ARCHITECTURES[args.arch], seed=args.seed)
        save_pipeline(pipe, args.out)
        print(args.out)
        return EXIT_OK
    from audit.testbed.package import TrainSpec, evaluate_folder, format_groups, train_and_package

    if args.action == "train":
        from audit.testbed.train import train_spec

        defaults = TrainSpec(seed=args.seed)
        spec = train_spec(
            args.kind, args.seed,
            vae_steps=args.vae_steps if args.vae_steps is not None else defaults.vae_steps,
            unet_steps=args.unet_steps if args.unet_steps is not None else defaults.unet_steps,
        )
        command = "memaudit testbed train OUT" + (f" --kind {args.kind}" if args.kind != "glyphs" else "")
        command += f" --seed {args.seed}"
        if args.vae_steps is not None:
            command += f" --vae-steps {args.vae_steps}"
        if args.unet_steps is not None:
            command += f" --unet-steps {args.unet_steps}"
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        print(format_groups(train_and_package(args.out, spec, command, device=device)))
        print(args.out)
        return EXIT_OK
    if args.action == "train-lora":
        import dataclasses

        import torch

        from audit.testbed.lora import LoraSpec
        from audit.testbed.lora_package import train_and_package_lora

        overrides = {k: v for k, v in (("seed", args.seed), ("steps", args.steps)) if v is not None}
        command = "memaudit testbed train-lora OUT" + "".join(f" --{k} {v}" for k, v in overrides.items())
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        metrics = train_and_package_lora(args.out, dataclasses.replace(LoraSpec(), **overrides), command,
                                         device=device)
        print("with the adapter:\n" + format_groups(metrics["memorization"])
              + "\nbase alone:\n" + format_groups(metrics["memorization_without_adapter"]))
        print(args.out)
        return EXIT_OK
    from audit.testbed.checkpoints import testbed_folder
    from audit.testbed.package import remeasure

    folder = args.folder or testbed_folder()
    if args.write:
        print(format_groups(remeasure(folder, args.write)))
        return EXIT_OK
    recorded, measured = evaluate_folder(folder)
    print("recorded:\n" + format_groups(recorded) + "\nmeasured now:\n" + format_groups(measured))
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from audit.pipeline import run_audit  # imports Ray and torch: only when running

    result = run_audit(cfg, address=args.address, retry_failed=args.retry_failed, force=args.force, wait=args.wait,
                       report=not args.no_report)
    report = result.generation
    print(f"run: {result.location or result.run_path}")
    if result.screen is not None and _print_screen(result.screen, result.escalation) != EXIT_OK:
        return EXIT_FAILURE
    print(
        f"samples: {report.rows_written} written this time ({report.shards_written} shards), "
        f"{report.shards_skipped} of {report.shards_total} shards already complete"
        + (f", {report.rows_per_second:.2f} images/s" if report.rows_written else "")
    )
    truncated = (json.loads((result.run_path / layout.RUN_JSON).read_text())["prompts"].get("truncated") or {})
    if truncated.get("count"):
        print(f"prompts: {truncated['count']} longer than the text encoder's {truncated['max_tokens']} tokens, "
              f"truncated to them (run.json: prompts.truncated)")
    totals = _totals(result.run_path)
    print(f"status: {totals.get('ok', 0)} ok, {totals.get('error', 0)} error "
          f"in {totals['complete_shards']} of {report.shards_total} samples shards")
    embedded = result.embeddings
    while_generating = embedded.counts["embedded_while_generating"]
    during = f" ({while_generating} while generating)" if while_generating else ""
    print(f"embeddings: {embedded.shards_written} shards embedded now{during}, {embedded.shards_skipped} already current"
          + (f", {len(embedded.shards_failed)} failed" if embedded.shards_failed else ""))
    if result.neighbors is not None:
        print(f"neighbors: {result.neighbors.shards_written} shards joined now ({result.neighbors.counts['queries']} "
              f"queries), {result.neighbors.shards_skipped} already current")
    flagged, prompts = _flagged(result.run_path)
    print(f"detection: {result.detection.shards_written} shards scored now; "
          f"memorized prompts: {flagged} of {prompts} scored (prompt_scores/, matches/)")
    if result.report is not None:
        print(f"report: {result.report}")
    failed = {**report.shards_failed, **{f"embeddings {k}": v for k, v in embedded.shards_failed.items()},
              **{f"detection {k}": v for k, v in result.detection.shards_failed.items()}}
    if failed:
        first = next(iter(failed.items()))
        print(f"memaudit: {len(failed)} shards failed (e.g. {first[0]}: {first[1]}); "
              "run again to retry them", file=sys.stderr)
        return EXIT_FAILURE
    if totals.get("error", 0):
        print(f"memaudit: {totals['error']} samples failed ({'; '.join(report.first_errors) or 'see samples.error'}); "
              "re-run with --retry-failed", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _screen(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from audit.pipeline import run_screen  # imports Ray and torch: only when running

    result = run_screen(cfg, address=args.address, force=args.force, wait=args.wait)
    print(f"run: {result.location or result.run_path}")
    return _print_screen(result.screen, result.escalation)


def _print_screen(report: Any, escalation: dict[str, Any] | None) -> int:
    """The screen's lines of ``run`` and ``screen``; exit 1 when shards failed (nothing decided)."""
    print(f"screen: {report.shards_written} shards screened now, {report.shards_skipped} of {report.shards_total} "
          "already complete")
    if escalation is None:
        first = next(iter(report.shards_failed.items()), ("?", "?"))
        print(f"memaudit: {len(report.shards_failed)} screen shards failed (e.g. {first[0]}: {first[1]}); nothing is "
              "escalated until every prompt is screened: run again to retry them", file=sys.stderr)
        return EXIT_FAILURE
    print(f"escalated: {escalation['escalated']} of {escalation['screened']} prompts go on to the full audit "
          f"(escalation/escalation.parquet)" + (f", {escalation['unmeasured']} because the screen could not measure "
                                                 "them" if escalation["unmeasured"] else ""))
    return EXIT_OK


def _flagged(run_path: Path) -> tuple[int, int]:
    """Flagged and scored prompts over the run's complete prompt_scores shards, one file's column
    at a time (a dataset scan of 10⁴ files reads ahead hundreds of MB)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from audit.report.query import complete_files
    from audit.store import RunStore

    def count(path: Path) -> tuple[int, int]:
        flags = pq.read_table(path, columns=["flagged"]).column(0)
        return int(pc.sum(pc.fill_null(flags, False)).as_py() or 0), len(flags)

    files, _ = complete_files(RunStore(run_path), layout.PROMPT_SCORES)
    with ThreadPoolExecutor(4) as pool:  # Parquet reads release the GIL
        counts = list(pool.map(count, files))
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _totals(run_path: Path) -> dict[str, int]:
    """Sample status counts over the run's complete samples shards (a screened run has samples
    shards only for plan shards holding an escalated prompt; an adaptive run one more per round)."""
    from audit.ids import shard_name
    from audit.store import RunStore

    n_shards = int(json.loads((run_path / layout.RUN_JSON).read_text())["prompts"]["n_shards"])
    names = [shard_name(i, n_shards) for i in range(n_shards)]
    markers = run_path / layout.SAMPLES / "_markers"
    names += sorted(p.stem for p in markers.glob("*-r*.json")) if markers.is_dir() else []  # later rounds
    return RunStore(run_path).status_totals(layout.SAMPLES, names)


if __name__ == "__main__":
    sys.exit(main())
