"""Run and reference roots on S3, against a real S3-compatible server (moto's server mode in its
own process on 127.0.0.1), never an in-process mock. "Another node" is a second local cache: it
shares nothing with the first but the bucket."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.cli import main
from audit.errors import StorageError
from audit.location import Location
from audit.store import RunStore
from helpers import PROMPTS, free_port, s3, s3_bucket, write_config

BUCKET = "memaudit-test"
SCHEMA = pa.schema([("sample_id", pa.string()), ("status", pa.string()), ("error", pa.string())])


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, str]]:
    with s3_bucket(BUCKET) as env:
        yield env


@pytest.fixture()
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - returns a function
    """``node(name)`` switches this process to the local cache of another machine."""
    def switch(name: str) -> Path:
        cache = tmp_path / f"cache-{name}"
        monkeypatch.setenv("MEMAUDIT_CACHE", str(cache))
        return cache
    return switch


def _write_shard(store: RunStore, shard: str, ids: list[str]) -> dict:
    with store.open_shard("samples", shard, SCHEMA) as writer:
        writer.write({"sample_id": ids, "status": ["ok"] * len(ids), "error": [None] * len(ids)})
        return writer.commit()


def test_a_shard_published_on_one_node_is_complete_on_another(server: dict, node, tmp_path: Path) -> None:
    uri = f"s3://{BUCKET}/protocol/run=a"
    node("a")
    writer = RunStore(uri)
    marker = _write_shard(writer, "shard-00000", ["p-00000", "p-00001"])
    client = s3(server)
    assert client.cat(f"{BUCKET}/protocol/run=a/samples/_markers/shard-00000.json") == \
        writer.marker_path("samples", "shard-00000").read_bytes()
    assert client.size(f"{BUCKET}/protocol/run=a/samples/shard-00000.parquet") == marker["bytes"]

    node("b")
    reader = RunStore(uri)
    assert reader.path != writer.path and not reader.is_complete("samples", "shard-00000")
    assert reader.sync() == 1 and reader.is_complete("samples", "shard-00000")
    assert reader.shard_path("samples", "shard-00000").read_bytes() == writer.shard_path("samples", "shard-00000").read_bytes()
    assert reader.sync() == 0  # nothing new

    # the bucket is the truth: a marker deleted there (e.g. invalidated by another node) makes the shard incomplete here
    client.rm(f"{BUCKET}/protocol/run=a/samples/_markers/shard-00000.json")
    reader.sync()
    assert not reader.is_complete("samples", "shard-00000")


def test_a_shard_rewritten_on_another_node_replaces_the_adopted_one(server: dict, node) -> None:
    uri = f"s3://{BUCKET}/protocol/run=e"
    node("a")
    writer = RunStore(uri)
    _write_shard(writer, "shard-00000", ["v-00000"])
    node("b")
    reader = RunStore(uri)
    assert reader.sync() == 1 and reader.sync() == 0  # the second sync reads the adopted marker locally
    node("a")
    writer.invalidate("samples", "shard-00000")
    _write_shard(writer, "shard-00000", ["v-00000", "v-00001"])  # e.g. --retry-failed elsewhere
    node("b")
    assert reader.sync() == 1
    assert pq.read_table(reader.readable("samples", "shard-00000")).num_rows == 2


def test_a_shard_without_its_marker_or_of_another_size_is_not_adopted(server: dict, node) -> None:
    uri = f"s3://{BUCKET}/protocol/run=b"
    node("a")
    writer = RunStore(uri)
    _write_shard(writer, "shard-00000", ["x-00000"])
    _write_shard(writer, "shard-00001", ["y-00000"])
    client = s3(server)
    # a writer that died between the shard's upload and its marker's: the shard is not complete
    client.rm(f"{BUCKET}/protocol/run=b/samples/_markers/shard-00000.json")
    # a marker whose shard object was replaced by one of another size: not complete either
    client.pipe(f"{BUCKET}/protocol/run=b/samples/shard-00001.parquet", b"truncated")

    node("b")
    reader = RunStore(uri)
    reader.sync()
    assert not reader.is_complete("samples", "shard-00000")
    assert not reader.is_complete("samples", "shard-00001")
    assert not reader.marker_path("samples", "shard-00001").exists()


def test_readable_fetches_one_shard_another_node_published(server: dict, node) -> None:
    uri = f"s3://{BUCKET}/protocol/run=c"
    node("a")
    _write_shard(RunStore(uri), "shard-00003", ["z-00000", "z-00001", "z-00002"])
    node("b")
    path = RunStore(uri).readable("samples", "shard-00003")
    assert pq.read_table(path).column("sample_id").to_pylist() == ["z-00000", "z-00001", "z-00002"]


def test_invalidate_removes_the_marker_from_the_bucket_first(server: dict, node) -> None:
    uri = f"s3://{BUCKET}/protocol/run=d"
    node("a")
    store = RunStore(uri)
    _write_shard(store, "shard-00000", ["w-00000"])
    store.invalidate("samples", "shard-00000")
    assert not s3(server).exists(f"{BUCKET}/protocol/run=d/samples/_markers/shard-00000.json")
    node("b")
    other = RunStore(uri)
    other.sync()
    assert not other.is_complete("samples", "shard-00000")


def test_a_missing_bucket_or_an_unreachable_endpoint_is_refused_clearly(server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StorageError, match=r"run.root s3://no-such-bucket-here/runs: the bucket does not exist"):
        Location.of("s3://no-such-bucket-here/runs").check_writable("run.root")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as caught:
        Location.of(f"s3://{BUCKET}/runs").check_writable("run.root")
    text = str(caught.value)
    assert f"s3://{BUCKET}/runs" in text and "AWS_ENDPOINT_URL" in text and "\n" not in text, text


def test_reference_index_built_in_a_bucket(server: dict, node, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    local = tmp_path / "laion"
    (local / "img_emb").mkdir(parents=True)
    (local / "metadata").mkdir()
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(local / "img_emb" / "img_emb_0.npy", vectors.astype(np.float16))
    keys = [f"k{i:05d}" for i in range(300)]
    pq.write_table(pa.table({"key": keys, "caption": keys, "url": keys}), local / "metadata" / "metadata_0.parquet")
    (local / "embedding.json").write_text(json.dumps({"model_id": "synthetic", "dim": 16}))
    client = s3(server)
    client.put(str(local), f"{BUCKET}/laion", recursive=True)
    before = {k: v["ETag"] for k, v in client.find(f"{BUCKET}/laion", detail=True).items()}

    node("a")
    assert main(["-q", "reference", "index", f"s3://{BUCKET}/laion"]) == 0
    after = client.find(f"{BUCKET}/laion", detail=True)
    assert {k: after[k]["ETag"] for k in before} == before  # the inputs untouched
    manifest = json.loads(client.cat(f"{BUCKET}/laion/index/manifest.json"))
    assert manifest["count"] == 300 and all(f"{BUCKET}/laion/index/{s['file']}" in after for s in manifest["shards"])

    node("b")  # another machine searches the published index
    from audit.reference.locate import resolve_reference
    from audit.reference.search import ReferenceIndex

    scores, rows = ReferenceIndex(resolve_reference(f"s3://{BUCKET}/laion")).search(vectors[:5], 1, model_id="synthetic")
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def s3_audit(server: dict, ray_local: str, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The checkpoint and the testbed reference uploaded; an audit with every root in the bucket."""
    from audit.pipeline.reference import prepare_reference

    client = s3(server)
    client.put(str(tiny_checkpoint), f"{BUCKET}/models/tiny-sd", recursive=True)
    client.put(str(prepare_reference("builtin:testbed")), f"{BUCKET}/reference/testbed", recursive=True)
    folder = tmp_path_factory.mktemp("s3-audit")
    client.pipe(f"{BUCKET}/prompts/audit.txt", ("\n".join(PROMPTS[:4]) + "\n").encode())
    cfg = write_config(folder / "audit.yaml", run={"root": f"s3://{BUCKET}/runs", "seed": 0},
                       model={"path": f"s3://{BUCKET}/models/tiny-sd"}, prompts={"source": f"s3://{BUCKET}/prompts/audit.txt"},
                       generation={"samples_per_prompt": 2, "steps": 4, "prompts_per_shard": 1},
                       embedding={"kind": "builtin", "model": "testbed-copy"},
                       reference={"path": f"s3://{BUCKET}/reference/testbed"}, compute={"batch_size": 4})
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", str(cfg)])
    return {"code": code, "stdout": out.getvalue(), "cfg": cfg, "client": client}


def _run_uri(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("run: ")).removeprefix("run: ")


def _objects(client, uri: str) -> dict[str, str]:  # noqa: ANN001
    return {k: v["ETag"] for k, v in client.find(uri.removeprefix("s3://"), detail=True).items()}


def test_an_audit_with_its_roots_in_a_bucket_writes_every_table_there(s3_audit: dict) -> None:
    assert s3_audit["code"] == 0, s3_audit["stdout"]
    uri = _run_uri(s3_audit["stdout"])
    assert uri.startswith(f"s3://{BUCKET}/runs/model=tiny-sd/checkpoint=")
    assert f"report: {uri}/report/index.html" in s3_audit["stdout"]
    names = {k.removeprefix(uri.removeprefix("s3://") + "/") for k in _objects(s3_audit["client"], uri)}
    for table in ("samples", "embeddings", "neighbors", "prompt_scores"):
        shards = {n for n in names if n.startswith(f"{table}/shard-") and n.endswith(".parquet")}
        markers = {n for n in names if n.startswith(f"{table}/_markers/")}
        assert len(shards) == len(markers) == 4, (table, sorted(names))
    assert {"run.json", "prompts/prompts.parquet", "report/index.html", "report/summary.json"} <= names
    assert not [n for n in names if ".tmp-" in n or "write-probe" in n]
    rows = pa.concat_tables([pq.read_table(io.BytesIO(s3_audit["client"].cat(f"{uri[5:]}/samples/{n}")))
                             for n in sorted(n.split("/")[-1] for n in names if n.startswith("samples/shard-"))])
    assert rows.num_rows == 8 and len(set(rows.column("sample_id").to_pylist())) == 8


def test_a_fresh_machine_resumes_from_the_bucket_alone(s3_audit: dict, node) -> None:
    uri = _run_uri(s3_audit["stdout"])
    client = s3_audit["client"]
    before = _objects(client, uri)
    node("fresh")  # an empty local cache: nothing but the bucket knows the run
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", str(s3_audit["cfg"]), "--no-report"])
    assert code == 0, out.getvalue()
    assert "samples: 0 written this time (0 shards), 4 of 4 shards already complete" in out.getvalue()
    assert "embeddings: 0 shards embedded now, 4 already current" in out.getvalue()
    assert _objects(client, uri) == before  # nothing rewritten
    assert main(["verify", uri]) == 0


def test_a_shard_invalidated_in_the_bucket_is_redone_identically(s3_audit: dict, node) -> None:
    uri = _run_uri(s3_audit["stdout"])
    client = s3_audit["client"]
    key = f"{uri[5:]}/samples/_markers/shard-00002.json"
    original = json.loads(client.cat(key))
    client.rm(key)
    node("another")
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["run", str(s3_audit["cfg"]), "--no-report"])
    assert code == 0, out.getvalue()
    assert "samples: 2 written this time (1 shards), 3 of 4 shards already complete" in out.getvalue()
    assert json.loads(client.cat(key))["sha256"] == original["sha256"]  # the same pixels, from the same seeds
    assert main(["verify", uri]) == 0


def test_compare_two_bucket_runs_publishes_its_page(s3_audit: dict, capsys: pytest.CaptureFixture) -> None:
    uri = _run_uri(s3_audit["stdout"])
    assert main(["compare", uri, uri]) == 0
    printed = capsys.readouterr().out
    page = next(line for line in printed.splitlines() if line.startswith("compare: ")).removeprefix("compare: ")
    assert page.startswith(f"{uri}/compare/vs-") and s3_audit["client"].exists(page.removeprefix("s3://"))


def test_a_bucket_lock_is_held_once_and_a_dead_holders_lock_expires(server: dict) -> None:
    from audit.lease import DEFAULT_TTL_S
    from audit.watch_state import BucketState

    state = BucketState(f"s3://{BUCKET}/locks/model=m")
    with state.lock("step-1.lock") as first:
        with state.lock("step-1.lock") as second:
            assert first and not second
    with state.lock("step-1.lock") as again:
        assert again  # released by its holder
    import time

    stale = {"token": "gone", "host": "gone", "process_id": 1, "renewed_at": time.time() - DEFAULT_TTL_S - 60}
    s3(server).pipe(f"{BUCKET}/locks/model=m/step-2.lock", json.dumps(stale).encode())
    with state.lock("step-2.lock") as taken:
        assert taken


def test_a_live_holder_renews_its_bucket_lock(server: dict) -> None:
    import time

    from audit import watch_state

    state = watch_state.BucketState(f"s3://{BUCKET}/locks/model=r")
    # renewed every 0.6 s; a holder gives up after 3 s without a renewal, which a loaded 2-core
    # machine (moto's single-threaded server answering late) reached with a 3 s time to live
    with state.lock("step-1.lock", ttl_s=6.0) as held:
        time.sleep(13.0)  # well past the time to live: without renewal the lock would count as abandoned
        with state.lock("step-1.lock", ttl_s=6.0) as other:
            assert held and not other
    with state.lock("step-1.lock", ttl_s=6.0) as again:
        assert again


@pytest.mark.slow  # ~50 s on 2 cores; keeps the default suite under CI's 15 minutes
def test_watch_over_a_bucket_prefix_audits_each_checkpoint_once(server: dict, ray_local: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    from audit.testbed.architectures import TINY, build_pipeline, save_pipeline

    client = s3(server)
    for seed, name in enumerate(["step-900", "step-1000"]):
        local = save_pipeline(build_pipeline(TINY, seed=seed), tmp_path / "ckpts" / name)
        client.put(str(local), f"{BUCKET}/ckpts/{name}", recursive=True)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    cfg = write_config(tmp_path / "watch.yaml", run={"root": f"s3://{BUCKET}/watch-runs"},
                       prompts={"source": str(tmp_path / "prompts.txt")},
                       generation={"samples_per_prompt": 2, "steps": 2, "prompts_per_shard": 2}, compute={"batch_size": 4})
    assert main(["watch", f"s3://{BUCKET}/ckpts", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "watch: 2 audited now, 0 already audited" in out, out
    assert f"s3://{BUCKET}/watch-runs/model=ckpts/" in out and "/compare/vs-" in out
    state = f"{BUCKET}/watch-runs/.watch/ckpts"
    done = {name: json.loads(client.cat(f"{state}/{name}.json")) for name in ("step-900", "step-1000")}
    assert all(d["run"].startswith(f"s3://{BUCKET}/watch-runs/model=ckpts/") for d in done.values())
    assert client.exists(f"{state}/step-1000.compared.json")
    assert not [k for k in client.find(state) if k.endswith(".lock")]  # released

    assert main(["watch", f"s3://{BUCKET}/ckpts", str(cfg)]) == 0  # again: nothing new
    assert "watch: 0 audited now, 2 already audited" in capsys.readouterr().out


def test_reference_embedded_from_a_bucket_into_a_bucket_reads_its_images_back_anywhere(
        server: dict, ray_local: str, node, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from audit.reference.images import ReferenceImages
    from audit.reference.index import INDEX_DIR, load_manifest
    from audit.reference.sources import find_shards, read_chunks
    from audit.reference.training_set import write_shipped_training_set

    client = s3(server)
    source = write_shipped_training_set(tmp_path / "testbed")  # img2dataset webdataset shards
    client.put(str(source), f"{BUCKET}/i2d", recursive=True)
    node("driver")
    assert main(["-q", "reference", "embed", f"s3://{BUCKET}/i2d", f"s3://{BUCKET}/ref"]) == 0
    assert main(["-q", "reference", "index", f"s3://{BUCKET}/ref"]) == 0
    names = set(client.find(f"{BUCKET}/ref"))
    n_shards = len(find_shards(source))
    for folder, suffix in (("img_emb", ".npy"), ("metadata", ".parquet"), ("_markers", ".json")):
        assert len([n for n in names if f"/ref/{folder}/" in n and n.endswith(suffix)]) == n_shards, sorted(names)
    assert f"{BUCKET}/ref/embedding.json" in names and f"{BUCKET}/ref/index/manifest.json" in names
    marker = json.loads(client.cat(f"{BUCKET}/ref/_markers/0.json"))
    assert marker["source"] == f"s3://{BUCKET}/i2d/{find_shards(source)[0].path.name}"

    node("elsewhere")  # a machine that never saw the source folder reads the pixels back through the bucket
    from audit.reference.locate import resolve_reference

    root = resolve_reference(f"s3://{BUCKET}/ref")
    images = ReferenceImages(root, load_manifest(root / INDEX_DIR))
    key, _, image = images.get(np.array([0]))[0]
    original = {k: v for rows in read_chunks(find_shards(source)[0]) for k, v in zip(rows["key"], rows["image"])}
    assert image is not None and image == original[key]
    capsys.readouterr()
    assert main(["-q", "reference", "embed", f"s3://{BUCKET}/i2d", f"s3://{BUCKET}/ref"]) == 0  # resumes: nothing to do
    assert f"0 embedded now, {n_shards} of {n_shards} already complete" in capsys.readouterr().out


def test_a_mirror_fetches_an_object_rewritten_with_the_same_size(server: dict, node) -> None:
    client = s3(server)
    client.pipe(f"{BUCKET}/small/index/manifest.json", b'{"v": 1}')
    client.pipe(f"{BUCKET}/small/img_emb/a.npy", b"0123456789")
    node("a")
    local = Location.of(f"s3://{BUCKET}/small").materialize("reference.path")
    assert (local / "index" / "manifest.json").read_bytes() == b'{"v": 1}'
    client.pipe(f"{BUCKET}/small/index/manifest.json", b'{"v": 2}')  # same size, new content
    assert Location.of(f"s3://{BUCKET}/small").materialize("reference.path") == local
    assert (local / "index" / "manifest.json").read_bytes() == b'{"v": 2}'
    assert (local / "img_emb" / "a.npy").read_bytes() == b"0123456789"


def test_analysts_read_bucket_runs_with_polars_and_hive_keys(s3_audit: dict, server: dict) -> None:
    import polars as pl

    uri = _run_uri(s3_audit["stdout"])
    options = {"aws_endpoint_url": server["AWS_ENDPOINT_URL"], "aws_access_key_id": server["AWS_ACCESS_KEY_ID"],
               "aws_secret_access_key": server["AWS_SECRET_ACCESS_KEY"], "aws_region": "us-east-1",
               "aws_allow_http": "true"}
    samples = pl.scan_parquet(f"s3://{BUCKET}/runs/model=*/checkpoint=*/run=*/samples/*.parquet",
                              storage_options=options, hive_partitioning=True).select("sample_id", "status", "run").collect()
    run_id = uri.rsplit("run=", 1)[-1]
    assert samples.height == 8 and samples["sample_id"].n_unique() == 8 and set(samples["run"]) == {run_id}
    scores = pl.read_parquet(f"{uri}/prompt_scores/*.parquet", storage_options=options)
    assert scores.height == 4 and "flagged" in scores.columns
