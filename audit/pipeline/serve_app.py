"""``memaudit serve REF [CONFIG]``: the check service on Ray Serve (docs/serving.md).

Deployments built from :mod:`audit.serve`'s Ray-free pieces:

- ``Embedder``: decodes and embeds with dynamic batching (``serve.batch``: the images of
  concurrent requests share a forward), replicas and GPU share configurable;
- ``Screener``, only when the service runs with a model (``--screen``): the audit's prompt screen
  against a baseline of the config's prompts (:class:`PromptScreener`);
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
import math
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
from audit.serve.screener import PromptScreener, prepare_screen

log = logging.getLogger(__name__)
APP_NAME = "memaudit-check"
INGRESS_CPUS, INDEX_CPUS, SCREENER_CPUS = 0.25, 0.25, 0.5  # logical CPUs a replica reserves
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]

api = FastAPI(title="memaudit check service", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown route, wrong method) in the service's shape."""
    return JSONResponse({"error": "http_" + str(exc.status_code), "detail": str(exc.detail)}, status_code=exc.status_code)


def _per_request(flat: list[Any], requests: list[list[Any]]) -> list[list[Any]]:
    """The answers to a batch of requests, flattened in order, dealt back to each request."""
    ends = np.cumsum([len(items) for items in requests]).tolist()
    return [flat[end - len(items) : end] for items, end in zip(requests, ends)]


@serve.deployment(name="embedder")
class Embedder:
    """A request's images -> their :class:`Embedded`; one call per request, the images of
    concurrent requests batched into one forward."""

    def __init__(self, section: dict[str, Any], device: str) -> None:
        self.embedder = ImageEmbedder(EmbeddingSection(**section), device)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, requests: list[list[bytes]]) -> list[list[Embedded]]:
        return _per_request(self.embedder.embed([image for images in requests for image in images]), requests)


@serve.deployment(name="screener")
class Screener:
    """Prompts -> their screen signals and score (:class:`PromptScreener`), the prompts of
    concurrent requests screened in one pass; present when the service runs with a model."""

    def __init__(self, config: dict[str, Any], baseline: list[str], device: str, dtype: str) -> None:
        self.screener = PromptScreener(AuditConfig.model_validate(config), baseline, device, dtype)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def screen(self, requests: list[list[str]]) -> list[list[dict[str, Any]]]:
        return _per_request(self.screener.screen([prompt for prompts in requests for prompt in prompts]), requests)


@serve.deployment
class IndexShards:
    """One group of the reference's index shards; the queries of concurrent requests are searched
    in one call (faiss is several times faster per query in batches)."""

    def __init__(self, reference: str, only: list[int]) -> None:
        self.searcher = ShardSearcher(Path(reference), only)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search(self, queries: list[np.ndarray], ks: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        scores, rows = self.searcher.search(np.concatenate(queries), max(ks))
        ends = np.cumsum([len(q) for q in queries]).tolist()
        return [(scores[end - len(q) : end, :k], rows[end - len(q) : end, :k]) for q, k, end in zip(queries, ks, ends)]


@serve.deployment(name="ingress")
@serve.ingress(api)
class CheckIngress:
    """The HTTP API. Every refusal is a 4xx JSON ``{error, detail}``; an exception while serving
    one request is its 500, never the replica's end."""

    def __init__(self, embedder: DeploymentHandle, shards: list[DeploymentHandle], settings: dict[str, Any],
                 screener: DeploymentHandle | None = None) -> None:
        self.embedder, self.shards, self.settings, self.screener = embedder, shards, settings, screener
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

    @api.post("/v1/screen")
    async def screen(self, request: Request) -> JSONResponse:
        """A prompt's screen signals: ``{"prompt": "..."}`` or ``{"prompts": [...]}``."""
        return await self._answer("screen", request, self._screen)

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
        screen = self.settings["screen"]
        return {key: self.settings[key] for key in ("reference", "model_id", "index", "counts", "thresholds")} | {
            "screen": screen and {k: v for k, v in screen.items() if k not in ("config", "baseline")},
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

    async def _screen(self, request: Request) -> dict[str, Any]:
        if self.screener is None:
            raise rules.Refusal(404, "screen_not_enabled", "this service was started without a model; start it with "
                                                           "--screen (memaudit serve) or screen_baseline=N (serve run)")
        prompts = rules.screen_prompts(request.headers.get("content-type"), await self._body(request))
        started = time.perf_counter()
        results = await self.screener.screen.remote(prompts)
        elapsed = 1e3 * (time.perf_counter() - started)
        return {"results": [r | {"timings_ms": {"screen_ms": elapsed}} for r in results]}

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
        embedded: list[Embedded] = await self.embedder.embed.remote(images)
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


def service_settings(reference: str, cfg: AuditConfig, token: str | None, max_body_mb: float,
                     screen_baseline: int | None = None) -> dict[str, Any]:
    """Everything the ingress needs, prepared once by the driver: the reference on this machine
    (a built-in one built on first use), the thresholds the audit would apply against it (its
    calibration, measured when missing), the index manifest's numbers, the token's digest; with
    ``screen_baseline``, the prompt screen's config and baseline prompts (checked here, so a
    screen the model cannot run is refused before anything starts)."""
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
        "screen": None if screen_baseline is None else _screen_settings(cfg, screen_baseline),
    }


def _screen_settings(cfg: AuditConfig, baseline_size: int) -> dict[str, Any]:
    screened, baseline = prepare_screen(cfg, baseline_size)
    assert screened.screen is not None
    return {"model": str(screened.model.path), "seeds": screened.screen.seeds, "steps": screened.screen.steps,
            "threshold": screened.screen.threshold, "baseline_prompts": len(baseline),
            "config": screened.model_dump(mode="json"), "baseline": baseline}


def build_app(settings: dict[str, Any], shard_group_count: int = 1, embedder_replicas: int = 1,
              embedder_gpus: float = 0.0, embedder_cpus: float = 1.0, screener_gpus: float = 0.0,
              ingress_replicas: int = 1) -> Any:
    """The application: ingress over an embedder and ``shard_group_count`` index-shard groups,
    and a screener when the settings have a screen. Pixel verification runs in the ingress, so
    ``ingress_replicas`` is what spreads it over more cores (docs/serving.md, "Throughput")."""
    from audit.generate.loading import resolve_numerics

    device = "cuda" if embedder_gpus > 0 else "cpu"
    embedder = Embedder.options(num_replicas=embedder_replicas, max_ongoing_requests=64,
                                ray_actor_options={"num_cpus": embedder_cpus, "num_gpus": embedder_gpus}).bind(
        settings["embedding"], device)
    groups = shard_groups(Path(settings["reference"]), shard_group_count)
    shards = [IndexShards.options(name=f"index-{i}", max_ongoing_requests=64, ray_actor_options={
        "num_cpus": INDEX_CPUS}).bind(settings["reference"], g) for i, g in enumerate(groups)]
    screener = None
    if settings["screen"] is not None:
        config = AuditConfig.model_validate(settings["screen"]["config"])
        screen_device, dtype = resolve_numerics(config.model, has_cuda=screener_gpus > 0)
        screener = Screener.options(max_ongoing_requests=32, ray_actor_options={
            "num_cpus": SCREENER_CPUS, "num_gpus": screener_gpus}).bind(
            settings["screen"]["config"], settings["screen"]["baseline"], screen_device, dtype)
    return CheckIngress.options(num_replicas=ingress_replicas, max_ongoing_requests=128,
                                ray_actor_options={"num_cpus": INGRESS_CPUS}).bind(
        embedder, shards, settings, screener)


def logical_cpus(shard_group_count: int = 1, embedder_replicas: int = 1, embedder_cpus: float = 1.0,
                 ingress_replicas: int = 1, screen: bool = False) -> int:
    """The logical CPUs :func:`build_app`'s replicas reserve, rounded up: a private local Ray gets
    at least these, so the application is placed on a machine with fewer cores (where the replicas
    share them) instead of waiting for CPUs that never come."""
    return math.ceil(embedder_replicas * embedder_cpus + ingress_replicas * INGRESS_CPUS
                     + shard_group_count * INDEX_CPUS + (SCREENER_CPUS if screen else 0.0))


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run audit.pipeline.serve_app:app_builder reference=REF [config=FILE]
    [token_env=NAME] [shard_groups=N] [embedder_replicas=N] [embedder_gpus=F] [ingress_replicas=N]
    [max_body_mb=F] [screen_baseline=N] [screener_gpus=F]`` and a RayService's ``import_path``
    (``screen_baseline`` turns the prompt screen on)."""
    import os

    cfg = load_config(args.get("config"))
    token = os.environ.get(args["token_env"]) if args.get("token_env") else None
    baseline = int(args["screen_baseline"]) if args.get("screen_baseline") else None
    settings = service_settings(args["reference"], cfg, token, float(args.get("max_body_mb", rules.MAX_BODY_BYTES / 2**20)),
                                baseline)
    return build_app(settings, int(args.get("shard_groups", 1)), int(args.get("embedder_replicas", 1)),
                     float(args.get("embedder_gpus", 0)), screener_gpus=float(args.get("screener_gpus", 0)),
                     ingress_replicas=int(args.get("ingress_replicas", 1)))


def start(settings: dict[str, Any], host: str, port: int, **options: Any) -> None:
    """Deploy the application on the connected Ray, HTTP on ``host``:``port``."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, **options), name=APP_NAME, route_prefix="/")
