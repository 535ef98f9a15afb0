"""Planning at scale (issue 22): the driver's time and peak memory to plan 10^5 to 10^7 prompts.

What ``memaudit run`` does on the driver before any cluster work (docs/architecture.md, "Data
flow", step 1, and "Invariants"), stage by stage on a synthetic prompt source (captions such as
``a photo of item 1234567 in style 17``; one row in ten repeats an earlier caption, some with extra
whitespace or a decomposed accent; one in a thousand is blank):

- ``read``: ``read_prompts`` (the source into :class:`audit.prompts.RawPrompts`);
- ``plan``: ``plan_prompts`` (normalise, hash, de-duplicate, the ``prompts/`` table);
- ``write``: ``prompts/prompts.parquet`` written as ``RunStore.write_table`` writes it;
- ``sha256``: ``PromptPlan.sha256`` (the run identity's ``prompts_sha256``);
- ``shards``: ``PromptPlan.shards()`` and one pass over them for names and sizes, as
  ``audit.pipeline.audit._audit_rounds`` does;
- ``resume``: a no-op resume, in its own process: ``prepare_run`` reads the source and plans again
  to hash the plan into the run's identity (the folder exists, so ``prompts.parquet`` is neither
  written nor read), then the shards are listed again;
- ``truncated`` (sizes up to ``--truncated-max``, default none): ``prepare_run``'s count of prompts
  longer than the text encoder reads (``audit.generate.tokens.truncated_prompts``, the testbed's
  CLIP tokenizer), made on every run and resume.

Each size and implementation runs in a fresh process that reports its own peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after each stage. ``old`` is the planning of
commit ``--old-ref`` (``audit/prompts.py`` and ``audit/plan.py`` as ``git show`` prints them,
loaded from a temporary folder), ``new`` the working tree; where both ran, the parent checks they
give byte-identical ``prompts.parquet`` files, the same ``sha256``, the same shards and the same
duplicate and blank counts.

    python benchmarks/planning.py                                  # old and new at 1e5, 1e6; new at 1e7
    python benchmarks/planning.py --sizes 100000 1000000 10000000 --old-max 10000000 --json planning.json
    python benchmarks/planning.py --kind txt --prompts-per-shard 1000
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OLD_REF = "b0c16b86f3d78a3e50c61466c6f2b07a6f87ac2c"  # the last commit before streaming planning
WRITE_ROWS = 1 << 16
STAGES = ("read", "plan", "write", "sha256", "shards")


def caption(row: int) -> str | None:
    """The synthetic caption of source row ``row``: mostly distinct, one in ten a repeat of an
    earlier row's caption (every third of those with doubled and trailing whitespace, every
    seventh of them with the accent of "café" decomposed), one in a thousand blank."""
    if row % 1000 == 999:
        return "   " if row % 2 else None
    if row % 10 == 9:
        base = (row // 10) * 7 % row
        text = caption(base) or "an empty frame"
        if row % 3 == 0:
            text = text.replace(" ", "  ") + "\t"
        if row % 7 == 0:
            text = text.replace("café", "cafe\u0301")
        return text
    style = row % 97
    return f"a photo of item {row} in style {style}" + (" at a café" if style == 5 else "")


def write_source(path: Path, n: int, kind: str) -> Path:
    """Write ``n`` rows of synthetic captions as a ``txt`` file (blank rows as empty lines) or a
    ``parquet`` file with LAION's ``caption``, ``key`` and ``url`` columns, chunk by chunk."""
    if kind == "txt":
        with path.open("w", encoding="utf-8") as handle:
            for start in range(0, n, WRITE_ROWS):
                handle.write("".join(f"{caption(i) or ''}\n" for i in range(start, min(n, start + WRITE_ROWS))))
        return path
    schema = pa.schema([("caption", pa.string()), ("key", pa.string()), ("url", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, n, WRITE_ROWS):
            rows = range(start, min(n, start + WRITE_ROWS))
            writer.write_table(pa.table({"caption": [caption(i) for i in rows],
                                         "key": [f"{i:09d}" for i in rows],
                                         "url": [f"https://example.com/{i}.jpg" for i in rows]}, schema=schema))
    return path


def load_old(ref: str, folder: Path) -> tuple[ModuleType, ModuleType]:
    """``audit/prompts.py`` and ``audit/plan.py`` of commit ``ref``, as modules of their own."""
    modules = []
    for name in ("prompts", "plan"):
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:audit/{name}.py"], check=True,
                                capture_output=True, text=True).stdout
        path = folder / f"old_{name}.py"
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location(f"memaudit_old_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def peak_mb() -> float:
    """This process's peak RSS so far in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shards_digest(shards: Any) -> str:
    """One hash over every shard's name, prompt ids and prompts (to compare implementations)."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard.index}\x00{shard.name}\x00{shard.first_sample}\x00{shard.end_sample}\x01".encode())
        digest.update("\x00".join(shard.prompt_ids).encode() + b"\x01")
        digest.update("\x00".join(shard.prompts).encode() + b"\x02")
    return digest.hexdigest()


def child(impl: str, source: Path, out: Path, per_shard: int, mode: str, old_ref: str,
          truncated: bool = False) -> dict[str, Any]:
    """Run the planning stages (``mode`` ``plan``) or a no-op resume (``resume``) with one
    implementation in this process; returns seconds and peak RSS after each stage."""
    from audit.config import PromptsSection
    from audit.files import write_parquet_atomic

    out.mkdir(parents=True, exist_ok=True)
    if impl == "old":
        prompts_module, plan_module = load_old(old_ref, out)
    else:
        import audit.plan as plan_module
        import audit.prompts as prompts_module
    section = PromptsSection(source=str(source))
    figures: dict[str, Any] = {"impl": impl, "mode": mode, "baseline_mb": peak_mb()}
    recorded: dict[str, Any] = {}

    def stage(name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = work()
        figures[name] = {"s": time.perf_counter() - start, "peak_mb": peak_mb()}
        return value

    raw = stage("read", lambda: prompts_module.read_prompts(section))
    plan = stage("plan", lambda: plan_module.plan_prompts(raw, per_shard))
    if mode == "plan":
        stage("write", lambda: write_parquet_atomic(out / "prompts.parquet", plan.table))
    recorded["sha256"] = stage("sha256", lambda: plan.sha256)

    def list_shards() -> Any:
        shards = plan.shards()
        names = [s.name for s in shards]
        sizes = sum(len(s.prompt_ids) for s in shards)
        return shards, names, sizes

    shards, _, _ = stage("shards", list_shards)
    if truncated:
        from audit.generate.tokens import truncated_prompts

        folder = REPO / "audit" / "testbed" / "trained" / "pipeline"
        stage("truncated", lambda: truncated_prompts(folder, plan.table.column("prompt_id").to_pylist(),
                                                     plan.table.column("prompt").to_pylist()))
    figures["total_s"] = sum(v["s"] for k, v in figures.items() if isinstance(v, dict))
    figures["peak_mb"] = peak_mb()
    if mode == "plan":
        recorded.update(n_prompts=plan.n_prompts, duplicates=plan.duplicates, skipped_blank=plan.skipped_blank,
                        n_shards=plan.n_shards, shards=shards_digest(shards),
                        file=hashlib.sha256((out / "prompts.parquet").read_bytes()).hexdigest())
    figures["recorded"] = recorded
    return figures


def run_child(impl: str, source: Path, out: Path, per_shard: int, mode: str, old_ref: str,
              truncated: bool = False) -> dict[str, Any]:
    """:func:`child` in a fresh Python process (its own peak RSS)."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, __file__, "--child", impl, mode, str(source), str(out), str(per_shard),
                           old_ref, str(int(truncated))], capture_output=True, text=True)
    if done.returncode != 0:
        return {"impl": impl, "mode": mode, "failed": (done.stderr or done.stdout)[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``identical`` when both runs recorded the same plan, else what differs."""
    if "failed" in old or "failed" in new:
        return "not compared (a run failed)"
    differ = [k for k in old["recorded"] if old["recorded"][k] != new["recorded"].get(k)]
    return "identical" if not differ else "DIFFERENT: " + ", ".join(differ)


def print_size(n: int, runs: dict[str, dict[str, dict[str, Any]]]) -> None:
    """One size's figures, the implementations side by side."""
    impls = list(runs)
    print(f"\n{n:,} source rows" + "".join(f" | {impl:>21}" for impl in impls))
    print(f"{'stage':<18}" + "".join(f" | {'seconds':>9} {'peak MiB':>11}" for _ in impls))
    truncated = any("truncated" in figures for modes in runs.values() for figures in modes.values())
    for mode, stages in (("plan", STAGES), ("resume", ("read", "plan", "sha256", "shards"))):
        for name in (*stages, *(["truncated"] if truncated else []), "total"):
            cells = []
            for impl in impls:
                figures = runs[impl].get(mode, {})
                if "failed" in figures or not figures:
                    cells.append(f" | {'failed' if figures else '-':>21}")
                elif name == "total":
                    cells.append(f" | {figures['total_s']:9.2f} {figures['peak_mb']:11.0f}")
                else:
                    cells.append(f" | {figures[name]['s']:9.2f} {figures[name]['peak_mb']:11.0f}")
            label = f"{mode}: {name}" if name != "total" else f"{mode}: total"
            print(f"{label:<18}" + "".join(cells))
    first = next(iter(runs.values()))["plan"]
    if "recorded" in first:
        r = first["recorded"]
        print(f"{r['n_prompts']:,} distinct prompts, {r['duplicates']:,} duplicates, {r['skipped_blank']:,} blank, "
              f"{r['n_shards']:,} shards")


def benchmark(sizes: list[int], old_max: int, kind: str, per_shard: int, old_ref: str,
              work: Path, impls: tuple[str, ...] = ("old", "new"), truncated_max: int = 0) -> list[dict[str, Any]]:
    """Plan each size with the old (up to ``old_max`` rows) and the new implementation, timing
    ``truncated_prompts`` too up to ``truncated_max`` rows; prints a table per size and returns
    every figure. The entry point benchmarks/scale.py calls."""
    results = []
    for n in sizes:
        source = write_source(work / f"source-{n}.{kind}", n, kind)
        impls_now = [i for i in impls if i == "new" or n <= old_max]
        runs: dict[str, dict[str, dict[str, Any]]] = {}
        for impl in impls_now:
            runs[impl] = {mode: run_child(impl, source, work / f"{impl}-{n}-{mode}", per_shard, mode, old_ref,
                                          n <= truncated_max)
                          for mode in ("plan", "resume")}
        print_size(n, runs)
        same = compare(runs["old"]["plan"], runs["new"]["plan"]) if len(runs) == 2 else "not compared"
        if len(runs) == 2:
            print(f"old vs new: {same}")
        elif "old" in impls:
            print(f"old not run at {n:,} rows (--old-max {old_max:,})")
        results.append({"rows": n, "kind": kind, "prompts_per_shard": per_shard, "runs": runs, "old_vs_new": same})
        source.unlink()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--old-max", type=int, default=1_000_000,
                        help="largest size the old implementation plans (10^7 takes it several GiB and minutes)")
    parser.add_argument("--kind", choices=["txt", "parquet"], default="parquet")
    parser.add_argument("--prompts-per-shard", type=int, default=None,
                        help="default: the config's generation.prompts_per_shard")
    parser.add_argument("--impls", nargs="+", choices=["old", "new"], default=["old", "new"])
    parser.add_argument("--old-ref", default=OLD_REF, help="the commit whose planning is 'old'")
    parser.add_argument("--truncated-max", type=int, default=0,
                        help="largest size whose runs also time truncated_prompts (~50 us a prompt on 2 cores)")
    parser.add_argument("--work", type=Path, help="folder for sources and outputs (default: a temporary one)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, mode, source, out, per_shard, old_ref, truncated = args.child
        print(json.dumps(child(impl, Path(source), Path(out), int(per_shard), mode, old_ref, truncated == "1")))
        return
    if args.prompts_per_shard is None:
        from audit.config_sections import GenerationSection

        args.prompts_per_shard = GenerationSection.model_fields["prompts_per_shard"].default
    with tempfile.TemporaryDirectory(prefix="memaudit-planning-", dir=args.work) as tmp:
        results = benchmark(args.sizes, args.old_max, args.kind, args.prompts_per_shard, args.old_ref, Path(tmp),
                            tuple(args.impls), args.truncated_max)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
