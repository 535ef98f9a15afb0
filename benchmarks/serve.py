"""The check service (docs/serving.md) under load, against the offline batch path, in one run.

On the built-in testbed reference, the same images (the testbed's 32x-duplicated training images
and held-out ones, as PNG) are checked

- offline: embed + search + verify of batches of 16 in this process (:func:`check_offline`);
- through the service on a local Ray (``memaudit serve``'s application, real HTTP with httpx):
  1, 8 and 64 concurrent clients, each sending single images (``POST /v1/check``) or batches of
  16 (``POST /v1/check-batch``) for ``--seconds`` seconds.

Prints images/s and requests/s, latency p50/p95/p99 per setting, the service's images/s at 64
clients over the offline path's (target >= 0.7) and p99/p50 at one client (target <= 3). Then the
search step alone at ``--search-vectors`` reference vectors (clustered synthetic unit vectors as
in ``benchmarks/knn_join.py``), with the default index and with the large-index recipe:
milliseconds per image, single queries and batches of 16.

    python benchmarks/serve.py                            # 1M vectors for the search step
    python benchmarks/serve.py --search-vectors 200000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from reference import clustered, write_folder

BATCH = 16


def images() -> tuple[list[bytes], list[str]]:
    """PNGs of the testbed's 32x-duplicated training images and of held-out images, with captions."""
    import io

    from PIL import Image

    from audit.testbed.checkpoints import shipped_folder
    from audit.testbed.dataset import build_dataset
    from audit.testbed.train import spec_from_dict

    spec = spec_from_dict(json.loads((shipped_folder("testbed") / "metrics.json").read_text())["training"]["spec"])
    items = [i for i in build_dataset(spec.dataset, spec.seed) if i.duplicates in (0, 32)][:64]
    out = []
    for item in items:
        buffer = io.BytesIO()
        Image.fromarray(item.image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out, [i.caption for i in items]


def percentiles(latencies: list[float]) -> dict[str, float]:
    values = np.array(latencies) * 1e3
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)}


def offline(settings: dict[str, Any], pngs: list[bytes], captions: list[str], seconds: float) -> dict[str, Any]:
    from audit.config import DetectionSection, EmbeddingSection
    from audit.detect.thresholds import Thresholds
    from audit.serve.checker import ImageEmbedder, ShardSearcher, Verifier, check_offline

    reference = Path(settings["reference"])
    embedder = ImageEmbedder(EmbeddingSection(**settings["embedding"]))
    searcher = ShardSearcher(reference)
    verifier = Verifier(reference, DetectionSection(**settings["detection"]), Thresholds.from_json(settings["thresholds"]))
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        start = (done // BATCH * BATCH) % len(pngs)
        check_offline(pngs[start : start + BATCH], captions[start : start + BATCH], embedder, [searcher], verifier, 10)
        done += len(pngs[start : start + BATCH])
    return {"images_per_s": done / (time.perf_counter() - started)}


async def load(url: str, clients: int, batch: bool, pngs: list[bytes], seconds: float) -> dict[str, Any]:
    """``clients`` concurrent clients sending for ``seconds``: images/s, requests/s, latencies."""
    latencies: list[float] = []
    counts = {"images": 0, "errors": 0}
    deadline = time.perf_counter() + seconds

    async def client(c: int, http: httpx.AsyncClient) -> None:
        i = c
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            if batch:
                chosen = [pngs[(i + j) % len(pngs)] for j in range(BATCH)]
                answer = await http.post("/v1/check-batch", files=[("image", (f"{j}.png", d, "image/png"))
                                                                   for j, d in enumerate(chosen)])
            else:
                chosen = [pngs[i % len(pngs)]]
                answer = await http.post("/v1/check", content=chosen[0], headers={"Content-Type": "image/png"})
            latencies.append(time.perf_counter() - began)
            counts["images" if answer.status_code == 200 else "errors"] += len(chosen)
            i += clients

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    elapsed = time.perf_counter() - started
    return {"clients": clients, "batch": BATCH if batch else 1, "images_per_s": counts["images"] / elapsed,
            "requests_per_s": len(latencies) / elapsed, "errors": counts["errors"], **percentiles(latencies)}


def search_step(n_vectors: int, dim: int, seconds: float) -> list[dict[str, Any]]:
    """Milliseconds per image of the search step alone at ``n_vectors`` reference vectors, with
    the default index (``auto``: exact Flat up to ``reference.flat_max_vectors``, 10^6) and with
    the large-index recipe ``IVF{nlist},SQ8`` + exact re-ranking (what ``auto`` picks above it)."""
    import shutil

    from audit.config import ReferenceSection
    from audit.reference.index import INDEX_DIR, build_index
    from audit.serve.checker import ShardSearcher

    data = clustered(n_vectors + 1024, dim, 1000, seed=0)
    queries = data[n_vectors:].astype(np.float32)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ref"
        write_folder(root, data[:n_vectors], per_file=250_000)
        for recipe, flat_max in (("auto", ReferenceSection().flat_max_vectors), ("ivf", 1)):
            shutil.rmtree(root / INDEX_DIR, ignore_errors=True)
            section = ReferenceSection(train_sample=min(n_vectors, 100_000), flat_max_vectors=flat_max)
            began = time.perf_counter()
            manifest = build_index(root, section)
            found: dict[str, Any] = {"vectors": n_vectors, "recipe": recipe, "factory": manifest["factory"],
                                     "build_s": time.perf_counter() - began}
            searcher = ShardSearcher(root)
            for size in (1, BATCH):
                times, i, until = [], 0, time.perf_counter() + seconds
                while time.perf_counter() < until:
                    chunk = queries[(i * size) % 1024 : (i * size) % 1024 + size]
                    t = time.perf_counter()
                    searcher.search(chunk, 10)
                    times.append((time.perf_counter() - t) / len(chunk))
                    i += 1
                found[f"batch{size}"] = percentiles(times)
            out.append(found)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per setting")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--search-vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--embedder-replicas", type=int, default=1)
    parser.add_argument("--ingress-replicas", type=int, default=2, help="verification runs in the ingress: "
                                                                        "one replica per core (default 2)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from ray import serve

    from audit.config import load_config
    from audit.pipeline.ray_setup import connect
    from audit.pipeline.serve_app import service_settings, start

    pngs, captions = images()
    connect(None)
    settings = service_settings("builtin:testbed", load_config(None), None, 64.0)
    results: dict[str, Any] = {"offline": offline(settings, pngs, captions, args.seconds), "service": []}
    print(f"offline (embed + search + verify, batches of {BATCH}, one process): "
          f"{results['offline']['images_per_s']:.1f} images/s", flush=True)
    port = free_port()
    start(settings, "127.0.0.1", port, embedder_replicas=args.embedder_replicas, ingress_replicas=args.ingress_replicas)
    for batch in (False, True):  # steady state: every replica's reference-image cache filled, not timed
        asyncio.run(load(f"http://127.0.0.1:{port}", 8, batch, pngs, 2.0))
    for batch in (False, True):
        for clients in args.clients:
            found = asyncio.run(load(f"http://127.0.0.1:{port}", clients, batch, pngs, args.seconds))
            results["service"].append(found)
            print(f"service, {clients:>3} clients, {found['batch']:>2} images/request: {found['images_per_s']:7.1f} "
                  f"images/s, {found['requests_per_s']:7.1f} requests/s, p50 {found['p50_ms']:.0f} ms, "
                  f"p95 {found['p95_ms']:.0f} ms, p99 {found['p99_ms']:.0f} ms, {found['errors']} errors", flush=True)
    serve.shutdown()
    best64 = max((r["images_per_s"] for r in results["service"] if r["clients"] == max(args.clients)), default=0.0)
    one = next(r for r in results["service"] if r["clients"] == min(args.clients) and r["batch"] == 1)
    results["targets"] = {"service_vs_offline_at_most_clients": best64 / results["offline"]["images_per_s"],
                          "p99_over_p50_one_client": one["p99_ms"] / one["p50_ms"]}
    print(json.dumps(results["targets"], indent=2), flush=True)
    results["search"] = search_step(args.search_vectors, args.dim, args.seconds)
    for s in results["search"]:
        print(f"search step at {s['vectors']:,} vectors, {s['recipe']} ({s['factory']}, built in {s['build_s']:.0f} s): "
              f"{s['batch1']['p50_ms']:.2f} ms per image alone (p99 {s['batch1']['p99_ms']:.2f}), "
              f"{s[f'batch{BATCH}']['p50_ms']:.2f} ms per image in batches of {BATCH}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
