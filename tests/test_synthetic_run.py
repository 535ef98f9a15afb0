"""benchmarks/synthetic_run.py (issue 22): a synthetic run is valid in every contract — each marker
matches its file, each derived shard is current for the real steps (so `memaudit run` on its
config resumes as a no-op), its rows are the plan's, the planted memorized prompts are the flagged
ones, and `verify` finds exactly the problems it plants. No Ray: the reference (testbed training
images) is embedded and indexed in this process."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from audit import layout
from audit.config import load_config
from audit.files import MARKERS, file_sha256
from audit.store import RunStore

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROMPTS, SAMPLES, PER_SHARD, MEMORIZED = 60, 3, 10, 4


@pytest.fixture(scope="module")
def synthetic() -> Iterator[Any]:
    """The benchmark module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import synthetic_run

        yield synthetic_run
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 testbed training images, embedded with the copy descriptor and indexed (what `memaudit
    reference testbed` does, without Ray); calibrated by the generator on first use, as by `run`."""
    from audit.embed.embedding import EmbedStage
    from audit.location import Location
    from audit.reference.embed_shard import embed_source_shard
    from audit.reference.folder import write_embedding_json
    from audit.reference.index import build_index
    from audit.reference.sources import find_shards
    from audit.reference.training_set import write_training_set
    from audit.testbed.checkpoints import testbed_folder
    from audit.testbed.dataset import build_dataset
    from audit.testbed.train import spec_from_dict

    spec = spec_from_dict(json.loads((testbed_folder() / "metrics.json").read_text())["training"]["spec"])
    items = [dataclasses.replace(item, duplicates=1) for item in build_dataset(spec.dataset, spec.seed)[:120]]
    out = tmp_path_factory.mktemp("synthetic-reference") / "ref"
    cfg = load_config(None)
    stage = EmbedStage(cfg.embedding, "cpu")
    for shard in find_shards(Location.of(write_training_set(items, out / "img2dataset")), "auto"):
        embed_source_shard(stage, Location.of(out), shard, int(shard.name))
    write_embedding_json(out, stage.model_id, stage.dim)
    build_index(out, cfg.reference)
    return out


@pytest.fixture(scope="module")
def run(synthetic: Any, reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return synthetic.write_synthetic_run(tmp_path_factory.mktemp("synthetic-run"), PROMPTS, SAMPLES, PER_SHARD,
                                         memorized=MEMORIZED, reference=str(reference), workers=1)


def test_every_marker_matches_its_file(run: Any) -> None:
    seen = 0
    for table in layout.SHARDED_TABLES:
        for path in sorted((run.run / table / MARKERS).glob("*.json")):
            marker = json.loads(path.read_text())
            shard = run.run / table / marker["file"]
            assert marker["bytes"] == shard.stat().st_size and marker["sha256"] == file_sha256(shard), shard
            assert marker["rows"] == pq.ParquetFile(shard).metadata.num_rows, shard
            assert marker["lease"] and marker["shard"] == shard.stem
            seen += 1
    assert seen == 5 * (PROMPTS // PER_SHARD)  # samples, embeddings, neighbors, matches, prompt_scores


def test_the_config_resolves_to_the_run_and_every_derived_shard_is_current(run: Any, reference: Path) -> None:
    """What `memaudit run CONFIG` would check before redoing a shard, with the steps' own recipes."""
    from audit.detect.detect_step import input_tables, settings_inputs
    from audit.detect.join import JoinStep
    from audit.detect.thresholds import for_audit
    from audit.embed.models import model_id_of
    from audit.embed.samples import inputs as embedding_inputs
    from audit.reference.index import INDEX_DIR, load_manifest
    from audit.runs import prepare_run, run_folder

    cfg = load_config(run.config)
    prepared = prepare_run(cfg)
    assert run_folder(prepared, "cpu", "float32").where.local == run.run
    store, model_id = RunStore(run.run), model_id_of(cfg.embedding)
    join = JoinStep(store, cfg.detection.k, reference, load_manifest(reference / INDEX_DIR))
    thresholds = for_audit(cfg.detection, cfg.reference, reference, model_id)
    assert json.loads((run.run / layout.THRESHOLDS_JSON).read_text()) == json.loads(json.dumps(thresholds.to_json()))
    detection = settings_inputs(cfg, thresholds)
    for spec in prepared.plan.shards():
        assert store.is_complete(layout.SAMPLES, spec.name)
        assert store.is_current(layout.EMBEDDINGS, spec.name, embedding_inputs(store, spec.name, model_id))
        assert store.is_current(layout.NEIGHBORS, spec.name, join.inputs(spec.name))
        assert store.is_current(layout.PROMPT_SCORES, spec.name,
                                store.inputs_of(spec.name, input_tables(cfg), detection))


def test_rows_are_the_plans_and_embeddings_align(run: Any) -> None:
    from audit.runs import prepare_run

    prepared = prepare_run(load_config(run.config))
    for spec in prepared.plan.shards():
        planned = spec.sample_rows(SAMPLES, prepared.cfg.run.seed)
        samples = pq.read_table(run.run / layout.shard_file(layout.SAMPLES, spec.name))
        assert samples.column("sample_id").to_pylist() == list(planned["sample_id"])
        assert samples.column("seed").to_pylist() == planned["seed"].tolist()
        embeddings = pq.read_table(run.run / layout.shard_file(layout.EMBEDDINGS, spec.name), columns=["sample_id"])
        assert embeddings.column("sample_id").equals(samples.column("sample_id"))


def test_the_planted_memorized_prompts_are_the_flagged_ones(run: Any) -> None:
    scores = pq.read_table(run.run / layout.PROMPT_SCORES)
    assert scores.num_rows == PROMPTS and len(run.memorized) == MEMORIZED
    assert set(scores.filter(scores["flagged"]).column("prompt_id").to_pylist()) == set(run.memorized)
    matches = pq.read_table(run.run / layout.MATCHES)
    verbatim = matches.filter(pc.and_(pc.equal(matches["label"], "matching_verbatim"), matches["own"]))
    assert set(verbatim.column("prompt_id").to_pylist()) == set(run.memorized)
    assert pc.count_distinct(verbatim["sample_id"]).as_py() == MEMORIZED * SAMPLES  # every sample of each


def test_verify_finds_exactly_the_planted_problems(synthetic: Any, reference: Path,
                                                   tmp_path: Path) -> None:
    from audit.reconcile import verify_run

    # 10⁵ samples in 100 shards: verify streams them shard by shard (docs/architecture.md, "Verify at scale")
    bad = synthetic.write_synthetic_run(tmp_path, 10_000, 10, 100, memorized=MEMORIZED,
                                        reference=str(reference), plant_problems=True, workers=1)
    assert {p.kind for p in bad.planted} == {"duplicated", "missing", "unplanned", "flipped_byte"}
    assert len({p.shard for p in bad.planted}) == 4
    result = verify_run(bad.run)
    assert len(result.problems) == 4, result.problems
    assert result.planned_samples == 100_000 and result.complete_shards == 99  # the flipped shard is not
    assert result.present_samples == 100_000 - 1000 + 1 - 1 + 1  # less the flipped shard; +dup -missing +unplanned
    kinds = ("1 sample_ids present more than once", "1 sample_ids not in the plan",
             "1 planned sample_ids missing from complete shards", "sha256 differs from its marker")
    assert all(sum(kind in line for line in result.problems) == 1 for kind in kinds), result.problems
    for problem in bad.planted:
        named = problem.sample_id if problem.sample_id else f"samples/{problem.shard}"
        assert sum(named in line for line in result.problems) == 1, (problem, result.problems)
    for problem in bad.planted:  # the shards holding planted rows have markers right for their files
        marker = json.loads((bad.run / layout.marker_file(layout.SAMPLES, problem.shard)).read_text())
        shard = bad.run / layout.shard_file(layout.SAMPLES, problem.shard)
        assert (marker["sha256"] == file_sha256(shard)) == (problem.kind != "flipped_byte")


def test_the_bucket_copy_is_a_valid_run_on_its_own(synthetic: Any, reference: Path, tmp_path: Path) -> None:
    """``s3=``: the run is put in a bucket (the tests' S3-compatible server); verified from the
    bucket alone (the local mirror removed first), and the second config names the bucket."""
    import shutil

    from helpers import s3_bucket

    from audit.location import Location
    from audit.reconcile import verify_run

    with s3_bucket("synthetic"):
        run = synthetic.write_synthetic_run(tmp_path, 20, SAMPLES, 5, memorized=2, reference=str(reference),
                                            s3="s3://synthetic/runs", workers=1)
        assert run.s3 == "s3://synthetic/runs/" + run.run.relative_to(tmp_path / "runs").as_posix()
        shutil.rmtree(Location.of(run.s3).local)
        result = verify_run(run.s3)
        assert result.ok and result.present_samples == 20 * SAMPLES, result.problems
        assert load_config(run.s3_config).run.root == "s3://synthetic/runs"
