"""A synthetic run folder of any size, valid in every contract, written in minutes: for measuring
what `memaudit verify`, `report` and a no-op `run` cost on 10^6–10^7 samples without generating
them (issue 22).

What it builds, under ``--out ROOT``:

- ``ROOT/prompts.parquet``: N synthetic captions (``caption``, ``key``), the prompt source;
- ``ROOT/audit.yaml``: the built-in default config (docs: README "Running an audit") with that
  source, ``run.root: runs`` and the given sample counts — ``memaudit run ROOT/audit.yaml`` opens
  this very run and finds nothing to do;
- the run folder ``ROOT/runs/model=…/checkpoint=…/run=…/`` (docs/schema.md), opened by the
  project's own :func:`audit.runs.prepare_run` and :func:`audit.runs.leased_run` (so ``prompts/``,
  ``run.json``, the folder name and the lease are the real ones), ``thresholds.json`` as detection
  writes it, and per plan shard ``samples/``, ``embeddings/``, ``neighbors/``, ``matches/`` and
  ``prompt_scores/``, each written through :meth:`audit.store.RunStore.open_shard` with the
  project's schemas, so every marker (bytes, sha256, rows, status_counts, lease, host, times) is
  the real writer's, and with the ``inputs`` the real steps record (``embedding_inputs``,
  :meth:`audit.detect.join.JoinStep.inputs`, :func:`audit.detect.detect_step.settings_inputs`):
  every shard is current for a real run ("Every derived shard's marker records inputs", schema.md).

How it stays fast and true at once. Every sample shows one image of a small set, encoded once:
``POOL`` distinct 8×8 noise images (the clean prompts; sample i of the j-th prompt shows pool
image (j·S + i) mod POOL) and, for the K planted memorized prompts, the training image of their
own reference row (their ``key`` in the prompt source is that row's key: detection's "own"). An
image's embedding (the configured embedder, run once per image), its kNN in the reference (the
reference's own index) and its verified pairs (the project's :class:`DetectStep`, run once on a
scratch run holding one prompt per distinct image sequence) are computed once; each shard's
tables are then these rows taken and relabelled with Arrow kernels (``sample_id`` =
``{prompt_id}-{idx:05d}`` by string kernels, audit/ids.py; seeds by :func:`audit.ids.sample_seed`).
So ``matches/`` and ``prompt_scores/`` hold what the real detection computes for these samples:
the planted prompts are flagged (``matching_verbatim`` copies of their own training image), the
others are not. Shards are written by worker processes, one shard at a time (bounded memory).

``--plant-problems`` plants one of each thing `memaudit verify` must find, in four shards: a
planned sample row present twice, a planned row left out, a row whose sample_id is not planned
(their shards' markers are correct for the files as written) and a flipped byte in a samples
file whose marker is left as it was. ``--s3 URI`` also puts the run in a bucket under ``URI`` (as
``run.root``: ``ROOT/audit-s3.yaml`` names it), through the run's mirror and
:func:`audit.remote.push_tree`.

    python benchmarks/synthetic_run.py --prompts 200 --samples-per-prompt 4 --prompts-per-shard 20 --out /tmp/syn
    python benchmarks/synthetic_run.py --prompts 1000000 --samples-per-prompt 10 --prompts-per-shard 100 --out /data/syn
    memaudit verify /tmp/syn/runs/model=*/checkpoint=*/run=*   # OK
    memaudit run /tmp/syn/audit.yaml                           # resumes: 0 written
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from audit import layout
from audit.files import LEASE_FILE
from audit.ids import prompt_id, sample_id_array, sample_seed, shard_name
from audit.lease import LeaseCheck
from audit.location import Location
from audit.schema import MATCHES, PROMPT_SCORES, PROMPTS, SAMPLES, SAMPLES_COMPRESSION, STATUS_OK
from audit.store import RunStore

log = logging.getLogger("synthetic_run")

POOL = 64  # distinct clean images (8x8 noise), encoded once
POOL_SIDE = 8
COMMAND = "benchmarks/synthetic_run.py"
SOURCE_FILE = "prompts.parquet"
CONFIG_FILE = "audit.yaml"
S3_CONFIG_FILE = "audit-s3.yaml"
RUNS_DIR = "runs"
MAX_OWN_IMAGES = 64  # distinct training images the memorized prompts copy
SCRATCH = "shard-00000"


# ---------------------------------------------------------------------------------------------
# What the generator returns


@dataclass(frozen=True)
class PlantedProblem:
    """One problem planted for `memaudit verify` to find: ``kind`` is ``duplicated`` (a planned row
    present twice in its shard), ``missing`` (a planned row left out), ``unplanned`` (a row whose
    sample_id is not in the plan) or ``flipped_byte`` (one byte of the file changed after its
    marker was written: ``offset``)."""

    kind: str
    table: str
    shard: str
    sample_id: str | None = None
    offset: int | None = None


@dataclass(frozen=True)
class SyntheticRun:
    """A written synthetic run."""

    run: Path  # the run folder on this machine
    config: Path  # `memaudit run CONFIG` opens this run
    memorized: tuple[str, ...]  # prompt ids of the planted memorized prompts (flagged in prompt_scores/)
    n_prompts: int
    samples_per_prompt: int
    n_shards: int
    n_samples: int  # rows written to samples/ (planned ones, ± the planted problems)
    seconds: dict[str, float]  # by phase, and "total"
    bytes: int  # the run folder's size on disk
    s3: str | None = None  # the run folder's URI when it was also put in a bucket
    s3_config: Path | None = None  # `memaudit run` on it opens the bucket's run
    planted: tuple[PlantedProblem, ...] = ()


# ---------------------------------------------------------------------------------------------
# Images: every sample shows one of them; their embeddings, neighbors and pairs are computed once


@dataclass
class Images:
    """The distinct images samples show (ids 0..POOL-1: the clean pool; POOL..: training images of
    own reference rows) and, per image, the rows every derived table takes for a sample showing it."""

    png: pa.Array
    thumb: pa.Array
    width: np.ndarray
    height: np.ndarray
    embedding: pa.Array  # fixed_size_binary: the configured embedder's output
    neighbors: pa.Table  # NEIGHBORS rows of every image, image after image
    neighbor_offsets: np.ndarray
    neighbor_counts: np.ndarray
    pairs: pa.Table | None = None  # MATCHES rows of every image, image after image (after detection)
    pair_offsets: np.ndarray | None = None
    pair_counts: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.png)


@dataclass
class Settings:
    """What every shard's writer needs: sent once to each worker process."""

    where: Location | None  # the run folder (None until it is opened)
    lease: LeaseCheck | None
    samples_per_prompt: int
    run_seed: int
    seed: int
    images: Images
    scores: pa.Table  # one PROMPT_SCORES row per template (see Templates)
    template_of_offset: np.ndarray  # clean prompt j -> its template row, indexed by (j*S) % POOL
    template_of_own: np.ndarray  # own image index -> its template row
    samples_extra: dict[str, Any]  # what the generation worker adds to its marker
    model_id: str  # the embedding model
    dim: int
    embedded_during: str | None  # "generation" when the generation workers embed (the default)
    embedding_schema: pa.Schema
    reference: Path  # the prepared reference folder and its index manifest (the join's inputs name them)
    manifest: dict[str, Any]
    k: int
    detection_tables: tuple[str, ...]
    detection_settings: dict[str, str]


@dataclass(frozen=True)
class ShardJob:
    """One plan shard to write: its prompts (in plan order, ``first`` the plan index of the first)
    and, per prompt, the own image it copies (-1: a clean prompt)."""

    index: int
    name: str
    first: int
    prompt_ids: tuple[str, ...]
    own: tuple[int, ...]
    problem: str | None = None  # "duplicated", "missing" or "unplanned"


def pool_pixels(seed: int, count: int = POOL, side: int = POOL_SIDE) -> list[np.ndarray]:
    """``count`` distinct RGB noise images (far apart in tiled L2, with structure: never one clique)."""
    rng = np.random.default_rng([seed, 8])
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]


def encode_images(pngs: list[bytes], thumbnail_size: int) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
    """The images as the generation step stores them: lossless PNG, thumbnail, width and height."""
    from audit.generate.png import decode_png, encode_thumbnail

    pixels = [decode_png(png) for png in pngs]
    thumbs = [encode_thumbnail(p, thumbnail_size) for p in pixels]
    width = np.array([p.shape[1] for p in pixels], np.int32)
    height = np.array([p.shape[0] for p in pixels], np.int32)
    return pa.array(pngs, pa.binary()), pa.array(thumbs, pa.binary()), width, height


def embed_images(cfg: Any, pngs: list[bytes]) -> tuple[np.ndarray, str, int]:
    """Each image embedded by the configured embedder, as the embedding step does: (float16 rows,
    model id, dim)."""
    from audit.embed.decode import decode_image
    from audit.embed.embedding import EmbedStage

    stage = EmbedStage(cfg.embedding, "cpu")
    out = stage.embed_decoded([decode_image(png, cfg.embedding.max_image_pixels) for png in pngs])
    if any(out["error"]):
        raise RuntimeError(f"embedding the synthetic images failed: {next(e for e in out['error'] if e)}")
    return out["embedding"], stage.model_id, stage.dim


def image_neighbors(cfg: Any, root: Path, manifest: dict[str, Any], embeddings: np.ndarray) -> pa.Table:
    """Each image's top-k reference neighbors as the kNN join writes them (sample_id = the image's
    number, relabelled per sample later)."""
    from audit.detect.join import neighbor_table, shard_of_rows
    from audit.reference.images import ReferenceImages
    from audit.reference.search import ReferenceIndex

    queries = embeddings.astype(np.float16).astype(np.float32)  # what the join reads back
    index = ReferenceIndex(root, nprobe=cfg.reference.nprobe, rerank=cfg.reference.rerank)
    scores, rows = index.search(queries, cfg.detection.k)
    rows[~(np.linalg.norm(queries, axis=1) > 0)] = -1
    labels = [str(i) for i in range(len(queries))]
    return neighbor_table(labels, labels, scores, rows, ReferenceImages(root, manifest).keys(rows),
                          shard_of_rows(manifest, rows))


def grouped(table: pa.Table, owner: np.ndarray, n: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """``table``'s rows ordered by ``owner`` (stable), with each owner's offset and count."""
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=n).astype(np.int64)
    return table.take(pa.array(order)), np.cumsum(counts) - counts, counts


def own_candidates(root: Path, manifest: dict[str, Any], count: int, seed: int) -> list[tuple[int, str, bytes]]:
    """``count`` reference rows with a key and an image, seeded: (row, key, PNG)."""
    from audit.reference.images import ReferenceImages

    images = ReferenceImages(root, manifest)
    total = int(manifest["rows"])
    order = np.random.default_rng([seed, 1]).permutation(total)
    found: list[tuple[int, str, bytes]] = []
    for start in range(0, total, 256):
        block = order[start:start + 256]
        got = images.get(block)
        for row in block.tolist():
            key, _, png = got[row]
            if key is not None and png is not None:
                found.append((row, key, png))
            if len(found) == count:
                return found
    return found


# ---------------------------------------------------------------------------------------------
# Rows of one shard, vectorised


@dataclass
class Rows:
    """The sample rows of one shard: per row its prompt (position in the shard), sample index and image."""

    prompt_pos: np.ndarray
    sample_idx: np.ndarray
    image: np.ndarray

    def take(self, keep: np.ndarray) -> Rows:
        return Rows(self.prompt_pos[keep], self.sample_idx[keep], self.image[keep])


def planned_rows(first: int, own: Sequence[int], samples_per_prompt: int) -> Rows:
    """Prompt after prompt, sample after sample (the generation step's order). Clean prompt j shows
    pool image (j*S + i) mod POOL as sample i; a memorized one its own image every time."""
    n_prompts, s = len(own), samples_per_prompt
    pos = np.repeat(np.arange(n_prompts, dtype=np.int64), s)
    idx = np.tile(np.arange(s, dtype=np.int32), n_prompts)
    own_of_row = np.asarray(own, np.int64)[pos]
    image = np.where(own_of_row >= 0, POOL + own_of_row, ((first + pos) * s + idx) % POOL)
    return Rows(pos, idx, image)


def plant(rows: Rows, problem: str | None, samples_per_prompt: int) -> Rows:
    """The rows with one planted problem: the second row present twice (``duplicated``), left
    out (``missing``), or a row with sample index ``samples_per_prompt`` (not planned) appended
    after the first prompt's last sample (``unplanned``)."""
    if problem is None:
        return rows
    if problem == "duplicated":
        return rows.take(np.insert(np.arange(len(rows.image)), 2, 1))
    if problem == "missing":
        return rows.take(np.delete(np.arange(len(rows.image)), 1))
    if problem == "unplanned":
        keep = np.insert(np.arange(len(rows.image)), samples_per_prompt, 0)
        extra = rows.take(keep)
        extra.sample_idx = extra.sample_idx.copy()
        extra.sample_idx[samples_per_prompt] = samples_per_prompt
        return extra
    raise ValueError(f"unknown planted problem {problem!r}")


def sample_ids(prompt_ids: pa.Array, rows: Rows) -> tuple[pa.Array, pa.Array]:
    """(sample_id, prompt_id) per row (:func:`audit.ids.sample_id_array`)."""
    pids = prompt_ids.take(pa.array(rows.prompt_pos))
    return sample_id_array(pids, rows.sample_idx), pids


def expanded(table: pa.Table, offsets: np.ndarray, counts: np.ndarray, image: np.ndarray,
             sids: pa.Array, pids: pa.Array) -> pa.Table:
    """Each row's image's rows of ``table``, relabelled with the row's sample_id and prompt_id."""
    per_row = counts[image]
    owner = np.repeat(np.arange(len(image)), per_row)
    within = np.arange(int(per_row.sum())) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    out = table.take(pa.array(np.repeat(offsets[image], per_row) + within))
    owners = pa.array(owner)
    out = out.set_column(out.schema.get_field_index("sample_id"), "sample_id", sids.take(owners))
    return out.set_column(out.schema.get_field_index("prompt_id"), "prompt_id", pids.take(owners))


def samples_table(s: Settings, job: ShardJob, rows: Rows, sids: pa.Array,
                  pids: pa.Array) -> tuple[pa.Table, np.ndarray]:
    """The samples/ rows (and their noise magnitudes: memorized prompts' higher, after Wen et al.)."""
    n = len(rows.image)
    rng = np.random.default_rng([s.seed, job.index])
    memorized = rows.image >= POOL
    noise = (rng.lognormal(0.0, 0.15, n) * np.where(memorized, 2.5, 1.0)).astype(np.float32)
    pid_list = [job.prompt_ids[p] for p in rows.prompt_pos.tolist()]
    seeds = [sample_seed(s.run_seed, p, i) for p, i in zip(pid_list, rows.sample_idx.tolist())]
    img = pa.array(rows.image)
    table = pa.table({
        "sample_id": sids, "prompt_id": pids, "sample_idx": pa.array(rows.sample_idx, pa.int32()),
        "seed": pa.array(seeds, pa.int64()), "image_png": s.images.png.take(img),
        "thumb_png": s.images.thumb.take(img), "width": pa.array(s.images.width[rows.image]),
        "height": pa.array(s.images.height[rows.image]), "noise_magnitude": pa.array(noise),
        "status": _repeated(STATUS_OK, n), "error": pa.nulls(n, pa.string()),
    })
    return table.cast(SAMPLES), noise


def _repeated(value: str, n: int) -> pa.Array:
    return pa.array([value], pa.string()).take(pa.array(np.zeros(n, np.int64)))


def embeddings_table(s: Settings, rows: Rows, sids: pa.Array, pids: pa.Array) -> pa.Table:
    n = len(rows.image)
    return pa.table({"sample_id": sids, "prompt_id": pids, "embedding": s.images.embedding.take(pa.array(rows.image)),
                     "status": _repeated(STATUS_OK, n), "error": pa.nulls(n, pa.string())},
                    schema=s.embedding_schema)


def scores_table(s: Settings, job: ShardJob, rows: Rows, noise: np.ndarray) -> pa.Table:
    """One prompt_scores row per prompt: its template's row (what detection computed for the same
    images), with its prompt_id and the mean noise magnitude of its own samples."""
    own = np.asarray(job.own, np.int64)
    plan_index = job.first + np.arange(len(own))
    template = s.template_of_offset[(plan_index * s.samples_per_prompt) % POOL]
    if s.template_of_own.size:
        template = np.where(own >= 0, s.template_of_own[np.maximum(own, 0)], template)
    table = s.scores.take(pa.array(template))
    sums = np.bincount(rows.prompt_pos, weights=noise.astype(np.float64), minlength=len(own))
    counts = np.bincount(rows.prompt_pos, minlength=len(own))
    mean = (sums / np.maximum(counts, 1)).astype(np.float32)
    table = table.set_column(0, "prompt_id", pa.array(job.prompt_ids, pa.string()))
    return table.set_column(table.schema.get_field_index("noise_magnitude"), "noise_magnitude", pa.array(mean))


# ---------------------------------------------------------------------------------------------
# Writing shards through the project's writers


class RunWriter:
    """Writes whole plan shards into the run (one per process): the run's store under the
    driver's lease, and the kNN join step whose ``inputs`` its neighbors shards record."""

    def __init__(self, settings: Settings) -> None:
        from audit.detect.join import JoinStep

        assert settings.where is not None, "the run folder is opened before shards are written"
        self.settings = settings
        self.store = RunStore(settings.where, settings.lease)
        self.join = JoinStep(self.store, settings.k, settings.reference, settings.manifest)

    def write(self, job: ShardJob) -> int:
        return write_shard(self.settings, self.store, self.join, job)


def write_shard(s: Settings, store: RunStore, join: Any, job: ShardJob) -> int:
    """Every table of one plan shard, each published with its marker, in the steps' order
    (samples, embeddings, neighbors, then matches and prompt_scores); returns the samples rows.
    ``join``: the run's :class:`audit.detect.join.JoinStep` (its ``inputs``)."""
    from audit.embed.samples import inputs as embedding_inputs

    name, S = job.name, s.samples_per_prompt
    rows = plant(planned_rows(job.first, job.own, S), job.problem, S)
    sids, pids = sample_ids(pa.array(job.prompt_ids, pa.string()), rows)
    samples, noise = samples_table(s, job, rows, sids, pids)
    _publish(store, layout.SAMPLES, name, SAMPLES, samples, s.samples_extra, SAMPLES_COMPRESSION)
    # the embedding step's commit_fields (audit/embed/samples.py), after the samples marker it names
    extra: dict[str, Any] = {"model_id": s.model_id, "dim": s.dim, "inputs": embedding_inputs(store, name, s.model_id)}
    if s.embedded_during:
        extra["during"] = s.embedded_during
    _publish(store, layout.EMBEDDINGS, name, s.embedding_schema, embeddings_table(s, rows, sids, pids), extra)
    images = s.images
    neighbors = expanded(images.neighbors, images.neighbor_offsets, images.neighbor_counts, rows.image, sids, pids)
    _publish(store, layout.NEIGHBORS, name, neighbors.schema, neighbors,
             {"inputs": join.inputs(name), "queries": len(rows.image)})
    assert images.pairs is not None and images.pair_offsets is not None and images.pair_counts is not None
    inputs = store.inputs_of(name, s.detection_tables, s.detection_settings)
    matches = expanded(images.pairs, images.pair_offsets, images.pair_counts, rows.image, sids, pids)
    _publish(store, layout.MATCHES, name, MATCHES, matches, {"inputs": inputs})
    _publish(store, layout.PROMPT_SCORES, name, PROMPT_SCORES, scores_table(s, job, rows, noise), {"inputs": inputs})
    return len(rows.image)


def _publish(store: RunStore, table: str, shard: str, schema: pa.Schema, rows: pa.Table, extra: Mapping[str, Any],
             compression: dict[str, str] | str = "zstd") -> None:
    with store.open_shard(table, shard, schema, compression) as writer:
        writer.write(rows)
        writer.commit(**extra)


_WORKER: RunWriter | None = None  # in a writer process


def _start_worker(settings: Settings) -> None:
    global _WORKER
    _WORKER = RunWriter(settings)


def _write_in_worker(job: ShardJob) -> int:
    assert _WORKER is not None, "worker not started"
    return _WORKER.write(job)


def write_shards(settings: Settings, jobs: Iterator[ShardJob], n_jobs: int, workers: int) -> int:
    """All shards, on ``workers`` processes (spawned: the driver holds a lease thread); returns rows."""
    rows, done, started, step = 0, 0, time.perf_counter(), max(1, n_jobs // 10)

    def progress(n: int) -> None:
        nonlocal rows, done
        rows, done = rows + n, done + 1
        if done % step == 0 or done == n_jobs:
            rate = rows / max(time.perf_counter() - started, 1e-9)
            log.info("shards: %d/%d written, %d samples, %.0f samples/s", done, n_jobs, rows, rate)

    if workers <= 1:
        writer = RunWriter(settings)
        for job in jobs:
            progress(writer.write(job))
        return rows
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(settings,)) as pool:
        pending: set[Future[int]] = set()
        for job in jobs:  # a few shards in flight per worker: the driver never holds the whole plan's jobs
            if len(pending) >= 4 * workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    progress(future.result())
            pending.add(pool.submit(_write_in_worker, job))
        for future in pending:
            progress(future.result())
    return rows


# ---------------------------------------------------------------------------------------------
# Templates: detection run once per distinct image sequence, on a scratch run


@dataclass
class Templates:
    scores: pa.Table
    template_of_offset: np.ndarray
    template_of_own: np.ndarray
    flagged_own: np.ndarray  # own image indexes whose prompt detection flags


def detect_templates(cfg: Any, thresholds: Any, settings: Settings, offsets: np.ndarray, own_keys: list[str],
                     scratch: Path) -> Templates:
    """Detection (the project's :class:`DetectStep`) on a scratch run holding one clean prompt per
    distinct pool offset (its samples show pool images offset, offset+1, …) and one memorized
    prompt per own image (keyed to its reference row, every sample showing that image). Fills
    ``settings.images.pairs`` (each image's verified pairs) and returns each template's
    prompt_scores row."""
    from audit.detect.detect_step import DetectStep, DetectTask

    store = RunStore(scratch)
    pids, sids, image = _scratch_run(store, settings, offsets, own_keys)
    DetectStep(cfg, store.where, thresholds, "cpu").run(DetectTask(SCRATCH, {}, (SCRATCH,)))
    matches = pq.read_table(store.shard_path(layout.MATCHES, SCRATCH)).cast(MATCHES)
    scores = pq.read_table(store.shard_path(layout.PROMPT_SCORES, SCRATCH)).cast(PROMPT_SCORES)
    _keep_pairs(settings.images, matches, sids, image)
    by_id = {p: i for i, p in enumerate(scores.column("prompt_id").to_pylist())}
    template_rows = np.array([by_id[p] for p in pids], np.int64)
    of_offset = np.full(POOL, -1, np.int64)
    of_offset[np.asarray(offsets, np.int64)] = template_rows[:len(offsets)]
    of_own = template_rows[len(offsets):]
    flagged = scores.column("flagged").to_numpy(zero_copy_only=False)[of_own].astype(bool)
    return Templates(scores, of_offset, of_own, np.flatnonzero(flagged))


def _scratch_run(store: RunStore, settings: Settings, offsets: np.ndarray,
                 own_keys: list[str]) -> tuple[list[str], pa.Array, np.ndarray]:
    """The template prompts' run (prompts/, samples/, embeddings/, neighbors/ of one shard) in
    ``store``; returns their prompt ids, and per sample row its sample_id and image."""
    S, n_own = settings.samples_per_prompt, len(own_keys)
    texts = [f"synthetic template caption {int(o)}" for o in offsets] + \
        [f"synthetic memorized template caption {i}" for i in range(n_own)]
    pids = [prompt_id(t) for t in texts]
    keys: list[str | None] = [None] * len(offsets) + list(own_keys)
    store.write_table(layout.PROMPTS, layout.PROMPTS_FILE, pa.table({
        "prompt_id": pids, "prompt": texts, "shard": [0] * len(pids), "source_row": list(range(len(pids))),
        "n_occurrences": [1] * len(pids), "key": keys, "url": [None] * len(pids)}, schema=PROMPTS))
    images = [(np.int64(o) + np.arange(S)) % POOL for o in offsets] + [np.full(S, POOL + i, np.int64)
                                                                       for i in range(n_own)]
    rows = Rows(np.repeat(np.arange(len(pids)), S), np.tile(np.arange(S, dtype=np.int32), len(pids)),
                np.concatenate(images))
    job = ShardJob(0, SCRATCH, 0, tuple(pids), tuple([-1] * len(offsets) + list(range(n_own))))
    sids, prompt_col = sample_ids(pa.array(pids, pa.string()), rows)
    samples, _ = samples_table(settings, job, rows, sids, prompt_col)
    _publish(store, layout.SAMPLES, SCRATCH, SAMPLES, samples, {}, SAMPLES_COMPRESSION)
    _publish(store, layout.EMBEDDINGS, SCRATCH, settings.embedding_schema,
             embeddings_table(settings, rows, sids, prompt_col), {})
    found = settings.images
    neighbors = expanded(found.neighbors, found.neighbor_offsets, found.neighbor_counts, rows.image, sids, prompt_col)
    _publish(store, layout.NEIGHBORS, SCRATCH, neighbors.schema, neighbors, {})
    return pids, sids, rows.image


def _keep_pairs(images: Images, matches: pa.Table, sids: pa.Array, image: np.ndarray) -> None:
    """Each image's verified pairs: those of the first scratch sample showing it."""
    first_sample: dict[int, str] = {}
    for sid, img in zip(sids.to_pylist(), image.tolist()):
        first_sample.setdefault(img, sid)
    image_of = {sid: img for img, sid in first_sample.items()}
    owner = np.array([image_of.get(sid, -1) for sid in matches.column("sample_id").to_pylist()], np.int64)
    keep = np.flatnonzero(owner >= 0)
    images.pairs, images.pair_offsets, images.pair_counts = grouped(matches.take(pa.array(keep)), owner[keep],
                                                                    images.count)


# ---------------------------------------------------------------------------------------------
# The run: config, prompts, plan, shards


def write_config(root: Path, name: str, run_root: str, n_prompts: int, samples_per_prompt: int,
                 prompts_per_shard: int, seed: int, reference: str, settings: Mapping[str, Mapping[str, Any]]) -> Path:
    """The built-in default config with the synthetic prompt source and sizes (and ``settings``:
    section -> {key: value} on top)."""
    from audit.config import DEFAULT_CONFIG

    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["run"] = {**data.get("run", {}), "root": run_root, "seed": seed}
    data["prompts"] = {"source": SOURCE_FILE, "format": "parquet", "text_column": "caption"}
    data["generation"] = {**data.get("generation", {}), "samples_per_prompt": samples_per_prompt,
                          "prompts_per_shard": prompts_per_shard}
    data["reference"] = {**data.get("reference", {}), "path": reference}
    for section, values in settings.items():
        data[section] = {**(data.get(section) or {}), **values}
    path = root / name
    header = (f"# Written by {COMMAND}: {n_prompts} synthetic prompts x {samples_per_prompt} samples; "
              "`memaudit run` on this file resumes the synthetic run.\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def write_prompt_source(path: Path, n_prompts: int, keys: dict[int, str]) -> None:
    """N distinct synthetic captions; the memorized ones (position -> key) carry their own training
    image's key (detection's "own": docs/schema.md, matches.own)."""
    numbers = pa.array(np.arange(n_prompts).astype(str))
    captions = pc.binary_join_element_wise("synthetic caption ", pc.utf8_lpad(numbers, 9, "0"), "")
    key = [None] * n_prompts
    for position, value in keys.items():
        key[position] = value
    pq.write_table(pa.table({"caption": captions, "key": pa.array(key, pa.string())}), path)


def parse_settings(assignments: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` strings (values parsed as YAML, like ``memaudit --set``) -> sections."""
    out: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or "." in name:
            raise ValueError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. detection.calibration=paper")
        out.setdefault(section, {})[name] = yaml.safe_load(value) if value.strip() else None
    return out


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = round(time.perf_counter() - start, 3)
        log.info("%s: %.1f s", phase, seconds[phase])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_synthetic_run(root: str | Path, n_prompts: int, samples_per_prompt: int, prompts_per_shard: int,
                        memorized: int = 10, seed: int = 0, reference: str = "builtin:testbed",
                        settings: Mapping[str, Mapping[str, Any]] | None = None, s3: str | None = None,
                        plant_problems: bool = False, workers: int | None = None) -> SyntheticRun:
    """Write a synthetic run under ``root`` (see the module docstring): ``n_prompts`` prompts,
    ``samples_per_prompt`` samples each, ``prompts_per_shard`` per shard, ``memorized`` of them
    planted memorized. ``reference``: the config's ``reference.path`` (a built-in one is built on
    first use, as `memaudit run` does). ``settings``: config overrides, section -> {key: value}.
    ``s3``: also put the run under this object-store URI (as ``run.root``). ``plant_problems``:
    plant the four problems of :class:`PlantedProblem`. ``workers``: writer processes (default: two
    per CPU: a shard's commit waits on fsync, not on the CPU); they are spawned, so a script
    calling this with more than one worker needs the ``if __name__ == "__main__":`` guard."""
    if not 0 <= memorized <= n_prompts:
        raise ValueError(f"memorized must be in [0, {n_prompts}], got {memorized}")
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    total = time.perf_counter()
    config = write_config(root, CONFIG_FILE, RUNS_DIR, n_prompts, samples_per_prompt, prompts_per_shard, seed,
                          reference, settings or {})
    with _timed(seconds, "reference"):
        cfg, ref_root, manifest, thresholds = _reference(config)
    with _timed(seconds, "images"):
        images, model_id, dim, candidates = _images(cfg, ref_root, manifest, memorized, seed)
    settings_ = _settings(cfg, thresholds, images, model_id, dim, ref_root, manifest, samples_per_prompt, seed)
    # (j*S) mod POOL repeats with period POOL in j: the first POOL prompts show every clean sequence
    offsets = np.unique((np.arange(min(n_prompts, POOL), dtype=np.int64) * samples_per_prompt) % POOL)
    with _timed(seconds, "templates"), tempfile.TemporaryDirectory(prefix=".synthetic-templates-", dir=root) as tmp:
        templates = detect_templates(cfg, thresholds, settings_, offsets, [key for _, key, _ in candidates], Path(tmp))
    if memorized and not templates.flagged_own.size:
        raise RuntimeError("no reference image gives a flagged prompt at this sample count; raise --samples-per-prompt")
    settings_ = replace(settings_, scores=templates.scores, template_of_offset=templates.template_of_offset,
                        template_of_own=templates.template_of_own)
    positions = np.sort(np.random.default_rng([seed, 2]).choice(n_prompts, memorized, replace=False))
    own_of = {int(p): int(templates.flagged_own[m % templates.flagged_own.size]) for m, p in enumerate(positions)}
    with _timed(seconds, "prompt source"):
        write_prompt_source(root / SOURCE_FILE, n_prompts, {p: candidates[o][1] for p, o in own_of.items()})
    with _timed(seconds, "plan"):
        from audit.runs import prepare_run

        prepared = prepare_run(cfg)
    planted = _planned_problems(prepared.plan.n_shards) if plant_problems else {}
    with _opened(prepared, cfg) as (store, check):
        settings_ = replace(settings_, where=store.where, lease=check)
        store.write_json(thresholds.to_json(), layout.THRESHOLDS_JSON)  # as detection does, before its shards
        pids = prepared.plan.table.column("prompt_id").to_pylist()
        keys = prepared.plan.table.column("key").to_pylist()
        own_by_key = {candidates[o][1]: o for o in set(own_of.values())}
        own = [own_by_key[k] if k is not None else -1 for k in keys]
        memorized_ids = tuple(p for p, k in zip(pids, keys) if k is not None)
        jobs = _jobs(pids, own, prepared.cfg.generation.prompts_per_shard, prepared.plan.n_shards, planted)
        with _timed(seconds, "shards"):
            n_samples = write_shards(settings_, jobs, prepared.plan.n_shards, workers or 2 * (os.cpu_count() or 1))
        problems = _record_problems(store, pids, prepared, planted)
        run_path = store.path
    s3_uri = s3_config = None
    if s3:
        with _timed(seconds, "s3"):
            s3_uri, s3_config = _push(root, run_path, s3, n_prompts, samples_per_prompt, prompts_per_shard, seed,
                                      reference, settings or {})
    seconds["total"] = round(time.perf_counter() - total, 3)
    return SyntheticRun(run_path, config, memorized_ids, n_prompts, samples_per_prompt, prepared.plan.n_shards,
                        n_samples, seconds, folder_bytes(run_path), s3_uri, s3_config, problems)


def _reference(config: Path) -> tuple[Any, Path, dict[str, Any], Any]:
    """The config, its reference (built and calibrated when missing, as `memaudit run` does), the
    index manifest and the detection thresholds."""
    from audit.config import load_config
    from audit.embed.models import model_id_of
    from audit.pipeline.reference import audit_thresholds, prepare_reference
    from audit.reference.index import INDEX_DIR, load_manifest

    cfg = load_config(config)
    if not cfg.reference.path:
        raise ValueError("a synthetic run needs reference.path (its neighbors and matches name reference rows)")
    ref_root = prepare_reference(str(cfg.reference.path), cfg.compute.lease_ttl_s)
    thresholds = audit_thresholds(cfg, ref_root, model_id_of(cfg.embedding))
    return cfg, ref_root, load_manifest(ref_root / INDEX_DIR), thresholds


def _images(cfg: Any, ref_root: Path, manifest: dict[str, Any], memorized: int,
            seed: int) -> tuple[Images, str, int, list[tuple[int, str, bytes]]]:
    """The pool and the candidate own images, encoded, embedded and searched once."""
    from audit.embed.storage import encode_embeddings
    from audit.generate.png import encode_png

    candidates = own_candidates(ref_root, manifest, min(2 * memorized, MAX_OWN_IMAGES), seed) if memorized else []
    pngs = [encode_png(p) for p in pool_pixels(seed)] + [png for _, _, png in candidates]
    png, thumb, width, height = encode_images(pngs, cfg.generation.thumbnail_size)
    vectors, model_id, dim = embed_images(cfg, pngs)

    neighbors = image_neighbors(cfg, ref_root, manifest, vectors)
    owner = np.array([int(s) for s in neighbors.column("sample_id").to_pylist()], np.int64)
    table, offsets, counts = grouped(neighbors, owner, len(pngs))
    images = Images(png, thumb, width, height, encode_embeddings(vectors), table, offsets, counts)
    return images, model_id, dim, candidates


def _settings(cfg: Any, thresholds: Any, images: Images, model_id: str, dim: int, ref_root: Path,
              manifest: dict[str, Any], samples_per_prompt: int, seed: int) -> Settings:
    """What the steps record in their markers, for this config on this machine."""
    import torch

    from audit.detect.detect_step import input_tables, settings_inputs
    from audit.embed.samples import schema as embedding_schema
    from audit.generate.loading import resolve_numerics
    from audit.pipeline.audit import embeds_while_generating

    device, dtype = resolve_numerics(cfg.model, torch.cuda.is_available())
    return Settings(
        where=None, lease=None, samples_per_prompt=samples_per_prompt, run_seed=cfg.run.seed, seed=seed,
        images=images, scores=PROMPT_SCORES.empty_table(), template_of_offset=np.zeros(0, np.int64),
        template_of_own=np.zeros(0, np.int64),
        samples_extra={"device": device, "dtype": dtype, "batch_size": cfg.compute.batch_size},
        model_id=model_id, dim=dim, embedded_during="generation" if embeds_while_generating(cfg, device) else None,
        embedding_schema=embedding_schema(dim, model_id),
        reference=ref_root, manifest=manifest, k=cfg.detection.k,
        detection_tables=input_tables(cfg), detection_settings=settings_inputs(cfg, thresholds))


@contextmanager
def _opened(prepared: Any, cfg: Any) -> Iterator[tuple[RunStore, LeaseCheck]]:
    """The run folder, created as `memaudit run` creates it, under its lease; refused when it exists."""
    import torch

    from audit.generate.loading import resolve_numerics
    from audit.runs import leased_run, run_folder

    device, dtype = resolve_numerics(cfg.model, torch.cuda.is_available())
    where = run_folder(prepared, device.split(":")[0], dtype).where
    if (where.local / layout.RUN_JSON).exists():
        raise FileExistsError(f"{where}: a run is there already; give another --out")
    with leased_run(prepared, device.split(":")[0], dtype, False, False, COMMAND) as (store, lease):
        yield store, lease.check


def _planned_problems(n_shards: int) -> dict[int, str]:
    """Shard index -> the problem planted there (four distinct shards spread over the run)."""
    if n_shards < 4:
        raise ValueError(f"planting problems needs at least 4 shards, the plan has {n_shards}")
    kinds = ("duplicated", "missing", "unplanned", "flipped_byte")
    return {(i + 1) * n_shards // 5 if n_shards >= 5 else i: kind for i, kind in enumerate(kinds)}


def _jobs(pids: list[str], own: list[int], per_shard: int, n_shards: int,
          planted: dict[int, str]) -> Iterator[ShardJob]:
    """One job per plan shard, with the row problem planted there (the flipped byte comes after)."""
    for i in range(n_shards):
        lo, hi = i * per_shard, min((i + 1) * per_shard, len(pids))
        problem = planted.get(i)
        yield ShardJob(i, shard_name(i, n_shards), lo, tuple(pids[lo:hi]), tuple(own[lo:hi]),
                       problem if problem != "flipped_byte" else None)


def _record_problems(store: RunStore, pids: list[str], prepared: Any,
                     planted: dict[int, str]) -> tuple[PlantedProblem, ...]:
    """What was planted, by kind; the flipped byte is flipped here (after its marker)."""
    S, per_shard, n_shards = prepared.cfg.generation.samples_per_prompt, prepared.cfg.generation.prompts_per_shard, \
        prepared.plan.n_shards
    out = []
    for index, kind in sorted(planted.items()):
        name = shard_name(index, n_shards)
        first = pids[index * per_shard]
        if kind == "flipped_byte":
            path = store.shard_path(layout.SAMPLES, name)
            offset = path.stat().st_size // 2
            with path.open("r+b") as handle:
                handle.seek(offset)
                byte = handle.read(1)[0]
                handle.seek(offset)
                handle.write(bytes([byte ^ 0xFF]))
            out.append(PlantedProblem(kind, layout.SAMPLES, name, offset=offset))
            continue
        if kind == "unplanned":
            out.append(PlantedProblem(kind, layout.SAMPLES, name, sample_id=f"{first}-{S:05d}"))
        else:  # the shard's second planned row (see plant)
            prompt = pids[index * per_shard + 1 // S]
            out.append(PlantedProblem(kind, layout.SAMPLES, name, sample_id=f"{prompt}-{1 % S:05d}"))
    return tuple(out)


def _push(root: Path, run_path: Path, uri: str, n_prompts: int, samples_per_prompt: int, prompts_per_shard: int,
          seed: int, reference: str, settings: Mapping[str, Mapping[str, Any]]) -> tuple[str, Path]:
    """Put the run under ``uri`` (its ``run.root``): copied into the run's local mirror (hard
    links), then published from there (data, markers, then run.json), as a driver writing to the
    bucket leaves it; returns the run's URI and a config naming the bucket as run.root."""
    from audit.remote import push_tree

    relative = run_path.relative_to(root / RUNS_DIR).as_posix()
    target = Location.of(f"{uri.rstrip('/')}/{relative}")
    if target.local.exists():
        shutil.rmtree(target.local)
    shutil.copytree(run_path, target.local, copy_function=_link_or_copy,
                    ignore=lambda _, names: [n for n in names if n == LEASE_FILE])
    pushed = push_tree(target.local, target.remote)
    log.info("%s: %d files published", target, pushed)
    config = write_config(root, S3_CONFIG_FILE, uri, n_prompts, samples_per_prompt, prompts_per_shard, seed,
                          reference, settings)
    return str(target), config


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, required=True)
    parser.add_argument("--samples-per-prompt", type=int, required=True)
    parser.add_argument("--prompts-per-shard", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the prompt source, the config and runs/")
    parser.add_argument("--memorized", type=int, default=10, help="planted memorized prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default="builtin:testbed", help="the config's reference.path")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another config setting, e.g. detection.calibration=paper")
    parser.add_argument("--s3", help="also put the run under this object-store URI (as run.root)")
    parser.add_argument("--plant-problems", action="store_true",
                        help="plant a duplicated, a missing and an unplanned sample and a flipped byte")
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: 2 per CPU)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = write_synthetic_run(args.out, args.prompts, args.samples_per_prompt, args.prompts_per_shard,
                                 args.memorized, args.seed, args.reference, parse_settings(args.settings), args.s3,
                                 args.plant_problems, args.workers)
    print(f"run: {result.run}")
    print(f"config: {result.config}")
    if result.s3:
        print(f"s3: {result.s3} (config {result.s3_config})")
    print(f"{result.n_prompts} prompts x {result.samples_per_prompt} samples = {result.n_samples} samples in "
          f"{result.n_shards} shards, {len(result.memorized)} memorized; {result.bytes / 2**20:.1f} MiB")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    for problem in result.planted:
        print(f"planted: {problem.kind} in {problem.table}/{problem.shard}"
              + (f" ({problem.sample_id})" if problem.sample_id else f" (byte {problem.offset})"))
    if args.json:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
        data["planted"] = [p.__dict__ for p in result.planted]
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
