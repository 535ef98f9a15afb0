"""How to store embeddings in Parquet: write/read speed, size and DuckDB readability.

Compares, on the same float16 matrix, ``fixed_size_list<float16>``, ``fixed_size_list<float32>``
and ``fixed_size_binary(2*dim)`` (what memaudit writes, see audit/embed/storage.py), and a
column added to a samples-like shard (which means rewriting its PNG bytes) against an aligned
table of its own. Rounds alternate and medians are printed; ``--json`` writes them.

    python benchmarks/embedding_storage.py [--rows 200000] [--dim 768] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.embed.storage import decode_embeddings, encode_embeddings


def _columns(x: np.ndarray) -> dict[str, Callable[[], pa.Array]]:
    d = x.shape[1]
    return {
        "fixed_size_list<float16>": lambda: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
        "fixed_size_list<float32>": lambda: pa.FixedSizeListArray.from_arrays(
            pa.array(x.astype(np.float32).reshape(-1)), d),
        "fixed_size_binary (chosen)": lambda: encode_embeddings(x),
    }


def _read_back(name: str, column: pa.ChunkedArray, d: int) -> np.ndarray:
    if name.startswith("fixed_size_binary"):
        return decode_embeddings(column, d)
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, d)


def bench_types(x: np.ndarray, work: Path, rounds: int) -> dict[str, dict[str, float | str]]:
    times: dict[str, dict[str, list[float]]] = {}
    results: dict[str, dict[str, float | str]] = {}
    for _ in range(rounds):
        for name, make in _columns(x).items():
            path = work / "emb.parquet"
            start = time.perf_counter()
            pq.write_table(pa.table({"sample_id": np.arange(len(x)), "embedding": make()}), path, compression="zstd")
            wrote = time.perf_counter() - start
            start = time.perf_counter()
            back = _read_back(name, pq.read_table(path).column("embedding"), x.shape[1])
            read = time.perf_counter() - start
            assert np.array_equal(back.astype(np.float16), x)
            entry = times.setdefault(name, {"write_s": [], "read_s": []})
            entry["write_s"].append(wrote)
            entry["read_s"].append(read)
            try:
                kind = duckdb.sql(f"select typeof(embedding) from '{path}' limit 1").fetchall()[0][0]
            except duckdb.Error as exc:
                kind = f"error: {str(exc).splitlines()[0]}"
            results[name] = {"bytes": path.stat().st_size, "duckdb_type": kind}
    for name, entry in times.items():
        results[name] |= {k: statistics.median(v) for k, v in entry.items()}
    return results


def bench_layout(x: np.ndarray, work: Path, png_bytes: int, rounds: int) -> dict[str, float]:
    """Adding an embedding column to a samples shard rewrites its images; an aligned table does not."""
    n = len(x)
    rng = np.random.default_rng(0)
    pngs = [rng.bytes(png_bytes) for _ in range(n)]
    samples = pa.table({"sample_id": [f"s{i}" for i in range(n)], "image_png": pngs})
    pq.write_table(samples, work / "samples.parquet", compression="none")
    column, aligned = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        table = pq.read_table(work / "samples.parquet").append_column("embedding", encode_embeddings(x))
        pq.write_table(table, work / "samples_with_column.parquet", compression="none")
        column.append(time.perf_counter() - start)
        start = time.perf_counter()
        pq.write_table(pa.table({"sample_id": samples.column("sample_id"), "embedding": encode_embeddings(x)}),
                       work / "embeddings.parquet")
        aligned.append(time.perf_counter() - start)
    return {"rewrite_samples_with_column_s": statistics.median(column), "aligned_table_s": statistics.median(aligned)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--png-bytes", type=int, default=20_000, help="image bytes per sample for the layout test")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        types = bench_types(x, Path(tmp), args.rounds)
        layout = bench_layout(x[: min(args.rows, 20_000)], Path(tmp), args.png_bytes, args.rounds)
    print(f"{args.rows} x {args.dim} float16, zstd, median of {args.rounds} alternating rounds")
    print(f"{'column type':28} {'write s':>8} {'read s':>8} {'MB':>7}  DuckDB reads it as")
    for name, r in types.items():
        print(f"{name:28} {r['write_s']:8.2f} {r['read_s']:8.2f} {r['bytes'] / 1e6:7.1f}  {r['duckdb_type']}")
    chosen = types["fixed_size_binary (chosen)"]
    for name, r in types.items():
        if r is not chosen:
            print(f"  vs {name}: writes {r['write_s'] / chosen['write_s']:.1f}x slower, "
                  f"reads {r['read_s'] / chosen['read_s']:.1f}x slower")
    n = min(args.rows, 20_000)
    print(f"{n} samples with {args.png_bytes // 1000} kB images: add a column to samples/ "
          f"{layout['rewrite_samples_with_column_s']:.2f} s vs aligned embeddings/ table {layout['aligned_table_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"types": types, "layout": layout, "args": vars(args) | {"json": str(args.json)}},
                                        indent=2))


if __name__ == "__main__":
    main()
