"""The check service (docs/serving.md): its pieces without Ray against the testbed reference, then
the application on Ray Serve (a local Ray) through real HTTP: copies of training images, held-out
images, batches, hostile requests, the prompt screen against the audit's own screen, the metrics
in Ray's Prometheus export, a replica killed under load. The reference is the testbed's, its index
rebuilt in three shards so that two index deployments merge their top-k."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from audit.config import load_config
from audit.serve import rules

TOKEN = "test-token-8f2c"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def testbed_items() -> dict[str, list[Any]]:
    """The shipped testbed's pairs, rebuilt from its recorded spec: the 32× duplicated training
    images (the audit flags their captions) and held-out images (never trained on)."""
    from audit.testbed.checkpoints import shipped_folder
    from audit.testbed.dataset import build_dataset
    from audit.testbed.train import spec_from_dict

    spec = spec_from_dict(json.loads((shipped_folder("testbed") / "metrics.json").read_text())["training"]["spec"])
    items = build_dataset(spec.dataset, spec.seed)
    return {"dup32": [i for i in items if i.duplicates == 32], "heldout": [i for i in items if i.duplicates == 0][:8]}


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in testbed reference with its index rebuilt in three shards (its images are read
    through the original's img2dataset shards, which its markers name)."""
    import shutil

    from audit.config import ReferenceSection
    from audit.pipeline.reference import prepare_reference
    from audit.reference.index import build_index

    builtin = prepare_reference("builtin:testbed")
    folder = tmp_path_factory.mktemp("reference") / "testbed-3-shards"
    shutil.copytree(builtin, folder, ignore=shutil.ignore_patterns(".memaudit-lease.json", "index"))
    assert len(build_index(folder, ReferenceSection(vectors_per_shard=500))["shards"]) == 3
    return folder


@pytest.fixture(scope="module")
def screened_run(ray_local: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``memaudit screen`` of the default config's prompts: what the service's screen must equal."""
    from audit.pipeline.screening import run_screen

    result = run_screen(load_config(None, [f"run.root={tmp_path_factory.mktemp('runs')}"]))
    assert result.escalation is not None
    return result.run_path


@pytest.fixture(scope="module")
def settings(ray_local: str, three_shards: Path) -> dict[str, Any]:
    from audit.pipeline.serve_app import service_settings

    return service_settings(str(three_shards), load_config(None), TOKEN, max_body_mb=2.0, screen_baseline=256)


def offline_checker(reference: Path, settings: dict[str, Any], groups: int) -> Any:
    from audit.config import DetectionSection, EmbeddingSection
    from audit.detect.thresholds import Thresholds
    from audit.serve.checker import ImageEmbedder, ShardSearcher, Verifier, check_offline, shard_groups

    embedder = ImageEmbedder(EmbeddingSection(**settings["embedding"]))
    searchers = [ShardSearcher(reference, g) for g in shard_groups(reference, groups)]
    verifier = Verifier(reference, DetectionSection(**settings["detection"]), Thresholds.from_json(settings["thresholds"]))
    return lambda images, captions, k=10: check_offline(images, captions, embedder, searchers, verifier, k)


@pytest.fixture(scope="module")
def offline(settings: dict[str, Any]) -> Any:
    return offline_checker(Path(settings["reference"]), settings, 2)


def own_key(result: dict[str, Any]) -> str | None:
    """The testbed item of the strongest verified candidate (keys are ``<item>-<copy>``)."""
    verified = [c for c in result["candidates"] if c["label"] == result["verdict"]]
    return verified[0]["key"].rsplit("-", 1)[0] if verified else None


def test_offline_pieces_label_training_copies_and_pass_held_out_images(offline: Any, testbed_items: dict) -> None:
    dup32, heldout = testbed_items["dup32"], testbed_items["heldout"]
    with_caption = offline([png(i.image) for i in dup32], [i.caption for i in dup32])
    assert [r["verdict"] for r in with_caption] == ["matching_verbatim"] * len(dup32)
    assert [own_key(r) for r in with_caption] == [i.key for i in dup32]
    without = offline([png(i.image) for i in dup32[:4]], [None] * 4)
    assert [r["verdict"] for r in without] == ["retrieved_verbatim"] * 4  # a copy, but no caption to call it own
    assert [r["verdict"] for r in offline([png(i.image) for i in heldout], [None] * len(heldout))] == ["none"] * len(heldout)
    bad = offline([b"", b"not an image"], [None, None])
    assert [r["status"] for r in bad] == ["error", "error"] and bad[0]["error"].startswith("zero_byte")


def test_three_shards_in_two_groups_answer_as_the_one_shard_index(offline: Any, settings: dict[str, Any],
                                                                   testbed_items: dict) -> None:
    from audit.pipeline.reference import prepare_reference

    whole = offline_checker(prepare_reference("builtin:testbed"), settings, 1)
    items = testbed_items["dup32"][:4] + testbed_items["heldout"][:4]
    images, captions = [png(i.image) for i in items], [i.caption for i in items]
    strip = lambda r: {k: v for k, v in r.items() if k != "timings_ms"}  # noqa: E731
    assert [strip(r) for r in offline(images, captions)] == [strip(r) for r in whole(images, captions)]


def test_request_rules_refuse_with_a_status_and_a_code() -> None:
    digest = rules.token_digest(TOKEN)
    rules.check_token(f"Bearer {TOKEN}", digest)
    rules.check_token(None, None)  # no token configured: open
    for header in (None, "Bearer nope", TOKEN, f"Basic {TOKEN}"):
        with pytest.raises(rules.Refusal) as refused:
            rules.check_token(header, digest)
        assert refused.value.status == 401
    with pytest.raises(rules.Refusal) as refused:
        rules.check_length("1000", 999)
    assert (refused.value.status, refused.value.error) == (413, "body_too_large")
    assert rules.check_image_type("image/PNG; charset=binary", False) == "image/png"
    with pytest.raises(rules.Refusal) as refused:
        rules.check_image_type("text/plain", True)
    assert refused.value.status == 415
    with pytest.raises(rules.Refusal):
        rules.check_image_type("multipart/form-data; boundary=x", False)
    assert rules.check_batch([b"a", b"b"], []) == [None, None]
    for images, captions, status in (([], [], 400), ([b"a"] * 65, [], 413), ([b"a", b"b"], ["one"], 400)):
        with pytest.raises(rules.Refusal) as refused:
            rules.check_batch(images, captions)
        assert refused.value.status == status
    assert rules.image_refusal("too_large: 9x9").status == 413 and rules.image_refusal("corrupt: x").status == 422


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def service(settings: dict[str, Any], screened_run: Path) -> Any:
    """The application with two index groups and the prompt screen (half a CPU for the embedder:
    the five deployments fit the module's two CPUs; started after the screen run, whose worker
    needs a whole one)."""
    from ray import serve

    from audit.pipeline.serve_app import start

    port = free_port()
    start(settings, "127.0.0.1", port, shard_group_count=2, embedder_cpus=0.5)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=120)
    yield client
    client.close()
    serve.shutdown()


def check(service: httpx.Client, body: bytes, content_type: str = "image/png", **params: str) -> httpx.Response:
    return service.post("/v1/check", content=body, headers={"Content-Type": content_type}, params=params)


def batch(service: httpx.Client, images: list[bytes], captions: list[str] | None = None) -> httpx.Response:
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return service.post("/v1/check-batch", files=files, data={"caption": captions} if captions else None)


def test_the_service_answers_health_and_info(service: httpx.Client, settings: dict[str, Any]) -> None:
    assert service.get("/v1/healthz").json() == {"status": "ok"}
    info = service.get("/v1/info").json()
    assert info["model_id"] == settings["model_id"] == "builtin:testbed-copy"
    assert info["counts"]["vectors"] > 0 and info["index"]["shards"] == 3
    assert info["thresholds"]["source"] == settings["thresholds"]["source"]
    assert info["screen"]["seeds"] == 4 and info["screen"]["baseline_prompts"] == 40


def test_training_copies_come_back_as_their_own_key_and_held_out_images_as_none(
        service: httpx.Client, testbed_items: dict, offline: Any) -> None:
    for item in testbed_items["dup32"]:
        for body, kind in ((png(item.image), "image/png"), (jpeg(item.image), "image/jpeg")):
            answer = check(service, body, kind, caption=item.caption)
            assert answer.status_code == 200, answer.text
            result = answer.json()
            assert result["verdict"] == "matching_verbatim" and own_key(result) == item.key, (kind, result)
            assert set(result["timings_ms"]) == {"embed_ms", "search_ms", "verify_ms", "total_ms"}
    for item in testbed_items["heldout"]:
        result = check(service, png(item.image)).json()
        assert result["verdict"] == "none", result
    # the service gives what the offline path gives (two shard groups merged either way)
    item = testbed_items["dup32"][0]
    (expected,) = offline([png(item.image)], [item.caption])
    got = check(service, png(item.image), caption=item.caption).json()
    assert got["candidates"] == expected["candidates"] and got["verdict"] == expected["verdict"]


def test_a_batch_equals_the_single_calls(service: httpx.Client, testbed_items: dict) -> None:
    items = testbed_items["dup32"][:3] + testbed_items["heldout"][:3]
    images, captions = [png(i.image) for i in items], [i.caption for i in items]
    answer = batch(service, images, captions)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    singles = [check(service, data, caption=caption).json() for data, caption in zip(images, captions)]
    strip = lambda r: {k: v for k, v in r.items() if k != "timings_ms"}  # noqa: E731
    assert [strip(r) for r in results] == [strip(r) for r in singles]
    assert [r["verdict"] for r in results] == ["matching_verbatim"] * 3 + ["none"] * 3
    # the same batch on /v1/check (multipart) gives the same answer
    files = [("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
    again = service.post("/v1/check", files=files, data={"caption": captions}).json()["results"]
    assert [strip(r) for r in again] == [strip(r) for r in results]


def bomb() -> bytes:
    """A valid PNG header declaring 30000×30000 pixels, a few hundred bytes long."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = (30000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def test_hostile_requests_get_their_4xx_and_the_service_keeps_answering(
        service: httpx.Client, testbed_items: dict) -> None:
    good = png(testbed_items["dup32"][0].image)
    cases = {
        "empty body": (check(service, b""), 400, "empty_body"),
        "not an image": (check(service, b"<html>not found</html>"), 422, "not_an_image"),
        "truncated png": (check(service, good[: len(good) // 2]), 422, "not_an_image"),
        "decompression bomb": (check(service, bomb()), 413, "image_too_large"),
        "wrong content type": (check(service, good, "text/plain"), 415, "unsupported_media_type"),
        "bad k": (check(service, good, k="0"), 400, "bad_k"),
        "unknown route": (service.get("/v1/nothing"), 404, "http_404"),
        "body over the limit": (check(service, b"\0" * (3 * 2**20)), 413, "body_too_large"),
        "no token": (httpx.post(str(service.base_url).rstrip("/") + "/v1/check", content=good,
                                headers={"Content-Type": "image/png"}), 401, "unauthorized"),
        "bad token": (service.post("/v1/check", content=good, headers={"Content-Type": "image/png",
                                                                       "Authorization": "Bearer wrong"}),
                      401, "unauthorized"),
    }
    for name, (answer, status, code) in cases.items():
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert answer.json()["error"] == code and answer.json()["detail"], name
    try:  # 100 MB: refused by its Content-Length (the server may close before the client sends it all)
        huge = check(service, b"\0" * (100 * 2**20))
        assert huge.status_code == 413 and huge.json()["error"] == "body_too_large"
    except httpx.TransportError:
        pass
    assert service.get("/v1/healthz").status_code == 200
    assert check(service, good).json()["verdict"] == "retrieved_verbatim"


def test_256_concurrent_requests_are_served(service: httpx.Client, testbed_items: dict) -> None:
    body = png(testbed_items["heldout"][0].image)

    async def storm() -> list[int]:
        async with httpx.AsyncClient(base_url=str(service.base_url), headers=dict(service.headers), timeout=300,
                                     limits=httpx.Limits(max_connections=256)) as client:
            answers = await asyncio.gather(*(client.post("/v1/check", content=body,
                                                         headers={"Content-Type": "image/png"}) for _ in range(256)))
            return [a.status_code for a in answers]

    codes = asyncio.run(storm())
    assert set(codes) <= {200, 503} and codes.count(200) > 0, sorted(set(codes))
    assert service.get("/v1/healthz").status_code == 200
    assert check(service, body).json()["verdict"] == "none"


def screen(service: httpx.Client, body: Any, content_type: str = "application/json") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return service.post("/v1/screen", content=content, headers={"Content-Type": content_type})


def test_the_screen_answers_what_the_audits_screen_recorded(service: httpx.Client, screened_run: Path) -> None:
    """Same seeds, batching and formula: a prompt's signals are its screen/ row, and with the run's
    prompts as the baseline its score and quantile are the run's."""
    import pyarrow.parquet as pq

    recorded = {r["prompt_id"]: r for r in pq.read_table(screened_run / "screen").to_pylist()}
    decided = {r["prompt_id"]: r for r in pq.read_table(screened_run / "escalation" / "escalation.parquet").to_pylist()}
    prompts = pq.read_table(screened_run / "prompts").column("prompt").to_pylist()
    chosen = [prompts[0], prompts[17], prompts[-1]]
    answer = screen(service, {"prompts": chosen})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    for prompt, result in zip(chosen, results):
        row, decision = recorded[result["prompt_id"]], decided[result["prompt_id"]]
        assert result["prompt"] == prompt and result["status"] == "ok" and result["n_seeds"] == 4
        np.testing.assert_allclose(result["noise_magnitude_seeds"], row["noise_magnitude_seeds"], rtol=1e-6)
        np.testing.assert_allclose(result["alignment_seeds"], row["alignment_seeds"], rtol=1e-5, atol=1e-7)
        assert result["screen_score"] == pytest.approx(decision["screen_score"], rel=1e-5, abs=1e-6)
        assert result["baseline_quantile"] == (len(prompts) - 1 - decision["rank"]) / len(prompts)
        assert result["above_threshold"] == (decision["screen_score"] >= 2.0)
    alone = screen(service, {"prompt": f"  {chosen[1]} "}).json()["results"][0]  # normalised as a plan does
    assert alone["prompt_id"] == results[1]["prompt_id"] and alone["screen_score"] == pytest.approx(results[1]["screen_score"])


def test_bad_screen_requests_get_their_4xx(service: httpx.Client) -> None:
    cases = {
        "wrong content type": (screen(service, b"a cat", "text/plain"), 415, "unsupported_media_type"),
        "not json": (screen(service, b"{prompt: a cat"), 400, "bad_json"),
        "no prompt": (screen(service, {"text": "a cat"}), 400, "no_prompt"),
        "blank prompt": (screen(service, {"prompt": "   "}), 400, "bad_prompt"),
        "not a string": (screen(service, {"prompts": ["a cat", 3]}), 400, "bad_prompt"),
        "too many": (screen(service, {"prompts": ["a cat"] * (rules.MAX_PROMPTS + 1)}), 413, "batch_too_large"),
        "too long": (screen(service, {"prompt": "a cat " * 1000}), 413, "prompt_too_long"),
    }
    for name, (answer, status, code) in cases.items():
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert answer.json()["error"] == code and answer.json()["detail"], name
    assert screen(service, {"prompt": "a cat"}).status_code == 200


def test_a_screen_the_model_cannot_run_is_refused_before_the_service_starts() -> None:
    from audit.errors import InputError
    from audit.serve.screener import prepare_screen

    with pytest.raises(InputError, match="guidance_scale is 1.0"):
        prepare_screen(load_config(None, ["generation.guidance_scale=1.0"]), 256)
    with pytest.raises(InputError, match="--screen-baseline 3"):
        prepare_screen(load_config(None), 3)


def test_the_cli_refuses_bad_service_options_before_starting_anything(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from audit.cli import main

    assert main(["serve", "builtin:testbed", "--ingress-replicas", "0"]) == 2
    assert "--ingress-replicas 0: it must be at least 1" in capsys.readouterr().err
    monkeypatch.delenv("MEMAUDIT_NO_SUCH_TOKEN", raising=False)
    assert main(["serve", "builtin:testbed", "--token-env", "MEMAUDIT_NO_SUCH_TOKEN"]) == 2
    assert "--token-env MEMAUDIT_NO_SUCH_TOKEN" in capsys.readouterr().err


def test_the_service_reserves_no_more_cpus_than_a_private_ray_is_given() -> None:
    from audit.pipeline.serve_app import logical_cpus

    assert logical_cpus() == 2 and logical_cpus(shard_group_count=4, ingress_replicas=2, screen=True) == 3


def test_requests_latency_and_verdicts_reach_rays_prometheus_export(service: httpx.Client, testbed_items: dict) -> None:
    import ray

    item = testbed_items["dup32"][1]
    assert check(service, png(item.image), caption=item.caption).json()["verdict"] == "matching_verbatim"
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = {"ray_memaudit_check_requests_total": 'route="check"', "ray_memaudit_check_latency_ms_bucket": 'le="50',
              "ray_memaudit_check_verdicts_total": 'verdict="matching_verbatim"'}
    deadline, missing = time.monotonic() + 90, set(wanted)
    while missing and time.monotonic() < deadline:  # Ray exports recorded metrics every few seconds
        time.sleep(2)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = {name for name, tag in wanted.items()
                   if not any(line.startswith(name + "{") and tag in line for line in text.splitlines())}
    assert not missing, f"not exported: {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["embedder", "index-0"])
def test_a_replica_killed_under_load_is_replaced(service: httpx.Client, testbed_items: dict, deployment: str) -> None:
    """Requests in flight when a replica dies fail with a 5xx at most; Serve starts another and
    later requests succeed."""
    import ray

    body = png(testbed_items["heldout"][1].image)
    prefix = f"SERVE_REPLICA::memaudit-check#{deployment}#"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]

    async def load_and_kill() -> list[int]:
        async with httpx.AsyncClient(base_url=str(service.base_url), headers=dict(service.headers), timeout=120) as client:
            async def one() -> int:
                try:
                    return (await client.post("/v1/check", content=body, headers={"Content-Type": "image/png"})).status_code
                except httpx.TransportError:
                    return 599
            flying = [asyncio.ensure_future(one()) for _ in range(32)]
            await asyncio.sleep(0.2)
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            return list(await asyncio.gather(*flying))

    codes = asyncio.run(load_and_kill())
    assert all(c == 200 or c >= 500 for c in codes), codes
    deadline = time.monotonic() + 120
    while True:
        answer = check(service, body)
        if answer.status_code == 200:
            break
        assert time.monotonic() < deadline, f"not replaced: {answer.status_code} {answer.text}"
        time.sleep(1)
    assert answer.json()["verdict"] == "none"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert names and name not in names  # a new replica serves


@pytest.mark.slow
def test_memaudit_serve_runs_until_terminated(tmp_path: Path, testbed_items: dict) -> None:
    """The command a user runs: its own private Ray, the screen on, checks and screens over HTTP,
    SIGTERM stops it with exit 0."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "MEMAUDIT_TEST_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "audit.cli", "serve", "builtin:testbed", "--port", str(port), "--screen",
               "--shard-groups", "2", "--token-env", "MEMAUDIT_TEST_TOKEN"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=60)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if client.get("/v1/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(2)
        while "serving" not in (tmp_path / "serve.log").read_text():  # answers come before serve.run returns
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        item = testbed_items["dup32"][2]
        assert check(client, png(item.image), caption=item.caption).json()["verdict"] == "matching_verbatim"
        assert screen(client, {"prompt": item.caption}).json()["results"][0]["status"] == "ok"
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert "memaudit serve: stopping" in (tmp_path / "serve.log").read_text()
