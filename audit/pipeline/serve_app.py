"""``memaudit serve REF [CONFIG]``: the check service on Ray Serve (docs/serving.md).

Three deployments built from :mod:`audit.serve`'s Ray-free pieces:

- ``Embedder``: decodes and embeds with dynamic batching (``serve.batch``: the images of
  concurrent requests share a forward), replicas and GPU share configurable;
- ``IndexShards`` (one deployment per group of index shards, ``index-0`` …): top-k with the join's
  exact re-ranking; the ingress merges their top-k (:func:`merge_topk`);
- ``CheckIngress`` (FastAPI): the routes, the request rules (:mod:`audit.serve.rules`), pixel
  verification and labels, and the metrics (Ray's Prometheus export).

``memaudit serve`` starts them on a private local Ray (or ``--address``); ``serve run
audit.pipeline.serve_app:app_builder reference=… [config=…]`` and a KubeRay RayService
(``cluster/rayservice.yaml``) start the same application through :func:`app_builder`.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations at run time
# (a postponed ``request: Request`` in Serve's class-based routes becomes a required query field).
import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics
from starlette.exceptions import HTTPException

from audit.config import AuditConfig, DetectionSection, EmbeddingSection, load_config
from audit.detect.thresholds import Thresholds
from audit.reference.search import merge_topk
from audit.serve import rules
from audit.serve.checker import (Embedded, ImageEmbedder, ShardSearcher, Verifier, embedded_queries, error_result,
                                 shard_groups, verified, with_timings)

log = logging.getLogger(__name__)
APP_NAME = "memaudit-check"
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]

api = FastAPI(title="memaudit check service", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown route, wrong method) in the service's shape."""
    return JSONResponse({"error": "http_" + str(exc.status_code), "detail": str(exc.detail)}, status_code=exc.status_code)


@serve.deployment(name="embedder")
class Embedder:
    """Image bytes -> :class:`Embedded`; one call per image, batched across requests."""

    def __init__(self, section: dict[str, Any], device: str) -> None:
        self.embedder = ImageEmbedder(EmbeddingSection(**section), device)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, images: list[bytes]) -> list[Embedded]:
        return self.embedder.embed(images)


@serve.deployment
class IndexShards:
    """One group of the reference's index shards."""

    def __init__(self, reference: str, only: list[int]) -> None:
        self.searcher = ShardSearcher(Path(reference), only)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.searcher.search(queries, k)


@serve.deployment(name="ingress")
@serve.ingress(api)
class CheckIngress:
    """The HTTP API. Every refusal is a 4xx JSON ``{error, detail}``; an exception while serving
    one request is its 500, never the replica's end."""

    def __init__(self, embedder: DeploymentHandle, shards: list[DeploymentHandle], settings: dict[str, Any]) -> None:
        self.embedder, self.shards, self.settings = embedder, shards, settings
        self.detection = DetectionSection(**settings["detection"])
        self.verifier = Verifier(Path(settings["reference"]), self.detection, Thresholds.from_json(settings["thresholds"]))
        self.requests = metrics.Counter("memaudit_check_requests", "Requests by route and status.",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram("memaudit_check_latency_ms", "Request latency (ms) by route.",
                                         boundaries=LATENCY_MS, tag_keys=("route",))
        self.verdicts = metrics.Counter("memaudit_check_verdicts", "Checked images by verdict.", tag_keys=("verdict",))

    @api.get("/v1/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/info")
    async def info(self, request: Request) -> JSONResponse:
        return await self._answer("info", request, self._info)

    @api.post("/v1/check")
    async def check(self, request: Request) -> JSONResponse:
        """One image as the body (``?caption=`` optional), or a multipart batch."""
        return await self._answer("check", request, self._check)

    @api.post("/v1/check-batch")
    async def check_batch(self, request: Request) -> JSONResponse:
        """A multipart batch: fields ``image`` (files) and optionally one ``caption`` per image."""
        return await self._answer("check-batch", request, self._check_batch)

    async def _answer(self, route: str, request: Request, handler: Any) -> JSONResponse:
        started = time.perf_counter()
        try:
            rules.check_token(request.headers.get("authorization"), self.settings["token_sha256"])
            status, body = 200, await handler(request)
        except rules.Refusal as refusal:
            status, body = refusal.status, refusal.body()
        except Exception as exc:  # noqa: BLE001 - one request's failure is its 500, not the replica's
            log.exception("check service: %s failed", route)
            status, body = 500, {"error": "internal", "detail": f"{type(exc).__name__}: {exc}"}
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(1e3 * (time.perf_counter() - started), tags={"route": route})
        return JSONResponse(body, status_code=status)

    async def _info(self, request: Request) -> dict[str, Any]:
        return {key: self.settings[key] for key in ("reference", "model_id", "index", "counts", "thresholds")} | {
            "verify_top": self.detection.verify_top, "k": self.detection.k,
            "limits": {"body_bytes": self.settings["max_body_bytes"], "batch": rules.MAX_BATCH,
                       "image_pixels": self.settings["max_image_pixels"]}}

    async def _body(self, request: Request) -> bytes:
        limit = self.settings["max_body_bytes"]
        rules.check_length(request.headers.get("content-length"), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise rules.too_large(len(body), limit)
        return bytes(body)

    async def _check(self, request: Request) -> dict[str, Any]:
        kind = rules.check_image_type(request.headers.get("content-type"), multipart_ok=True)
        if kind == rules.MULTIPART:
            return await self._check_batch(request)
        k = rules.check_k(request.query_params.get("k"), self.detection.k)
        body = await self._body(request)
        if not body:
            raise rules.Refusal(400, "empty_body", "the body is empty; send the image's bytes")
        (result,) = await self._check_images([body], [request.query_params.get("caption")], k)
        if result["status"] != "ok":
            raise rules.image_refusal(result["error"])
        return result

    async def _check_batch(self, request: Request) -> dict[str, Any]:
        if rules.media_type(request.headers.get("content-type")) != rules.MULTIPART:
            raise rules.Refusal(415, "unsupported_media_type", "send multipart/form-data with 'image' file fields")
        k = rules.check_k(request.query_params.get("k"), self.detection.k)
        rules.check_length(request.headers.get("content-length"), self.settings["max_body_bytes"])
        form = await request.form(max_files=rules.MAX_BATCH + 1, max_fields=rules.MAX_BATCH + 1)
        try:
            images = [await f.read() for f in form.getlist("image") if hasattr(f, "read")]
            captions = [str(c) for c in form.getlist("caption")]
        finally:
            await form.close()
        if sum(len(i) for i in images) > self.settings["max_body_bytes"]:
            raise rules.too_large(sum(len(i) for i in images), self.settings["max_body_bytes"])
        return {"results": await self._check_images(images, rules.check_batch(images, captions), k)}

    async def _check_images(self, images: list[bytes], captions: list[str | None], k: int) -> list[dict[str, Any]]:
        clock = [time.perf_counter()]
        embedded: list[Embedded] = list(await asyncio.gather(*(self.embedder.embed.remote(i) for i in images)))
        clock.append(time.perf_counter())
        queries = embedded_queries(embedded)
        if queries is None:
            return [error_result(e) for e in embedded]
        parts = await asyncio.gather(*(shard.search.remote(queries, k) for shard in self.shards))
        scores, rows = merge_topk(list(parts), k)
        clock.append(time.perf_counter())
        # pixel work off the event loop: other requests keep moving
        results = await asyncio.to_thread(verified, self.verifier, images, embedded, captions, scores, rows)
        clock.append(time.perf_counter())
        for result in with_timings(results, clock):
            if result["status"] == "ok":
                self.verdicts.inc(tags={"verdict": result["verdict"]})
        return results


def service_settings(reference: str, cfg: AuditConfig, token: str | None, max_body_mb: float) -> dict[str, Any]:
    """Everything the ingress needs, prepared once by the driver: the reference on this machine
    (a built-in one built on first use), the thresholds the audit would apply against it (its
    calibration, measured when missing), the index manifest's numbers, the token's digest."""
    from audit.embed.models import model_id_of
    from audit.pipeline.audit import check_reference
    from audit.pipeline.reference import audit_thresholds, prepare_reference
    from audit.reference.index import INDEX_DIR, load_manifest

    model_id = model_id_of(cfg.embedding)
    check_reference(cfg, model_id)
    folder = prepare_reference(reference, cfg.compute.lease_ttl_s)
    thresholds = audit_thresholds(cfg, folder, model_id)
    manifest = load_manifest(folder / INDEX_DIR)
    return {
        "reference": str(folder), "model_id": model_id, "token_sha256": rules.token_digest(token),
        "detection": cfg.detection.model_dump(mode="json"), "embedding": cfg.embedding.model_dump(mode="json"),
        "thresholds": thresholds.to_json(),
        "index": {k: manifest.get(k) for k in ("factory", "metric", "exact", "embedding", "search")} | {
            "shards": len(manifest["shards"])},
        "counts": {"vectors": int(manifest["count"]), "files": len(manifest["files"]),
                   "excluded": int(manifest.get("excluded", 0))},
        "max_body_bytes": int(max_body_mb * 2**20), "max_image_pixels": cfg.embedding.max_image_pixels,
    }


def build_app(settings: dict[str, Any], shard_group_count: int = 1, embedder_replicas: int = 1,
              embedder_gpus: float = 0.0, embedder_cpus: float = 1.0) -> Any:
    """The application: ingress over an embedder and ``shard_group_count`` index-shard groups."""
    device = "cuda" if embedder_gpus > 0 else "cpu"
    embedder = Embedder.options(num_replicas=embedder_replicas, max_ongoing_requests=64,
                                ray_actor_options={"num_cpus": embedder_cpus, "num_gpus": embedder_gpus}).bind(
        settings["embedding"], device)
    groups = shard_groups(Path(settings["reference"]), shard_group_count)
    shards = [IndexShards.options(name=f"index-{i}", ray_actor_options={"num_cpus": 0.25}).bind(settings["reference"], g)
              for i, g in enumerate(groups)]
    return CheckIngress.options(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.5}).bind(
        embedder, shards, settings)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run audit.pipeline.serve_app:app_builder reference=REF [config=FILE]
    [token_env=NAME] [shard_groups=N] [embedder_replicas=N] [embedder_gpus=F] [max_body_mb=F]``
    and a RayService's ``import_path``."""
    import os

    cfg = load_config(args.get("config"))
    token = os.environ.get(args["token_env"]) if args.get("token_env") else None
    settings = service_settings(args["reference"], cfg, token, float(args.get("max_body_mb", rules.MAX_BODY_BYTES / 2**20)))
    return build_app(settings, int(args.get("shard_groups", 1)), int(args.get("embedder_replicas", 1)),
                     float(args.get("embedder_gpus", 0)))


def start(settings: dict[str, Any], host: str, port: int, **options: Any) -> None:
    """Deploy the application on the connected Ray, HTTP on ``host``:``port``."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, **options), name=APP_NAME, route_prefix="/")
