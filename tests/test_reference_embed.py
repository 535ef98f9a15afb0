"""img2dataset for real: a loopback HTTP server, img2dataset, then `memaudit reference embed`
(on a local Ray) and `reference index`, checked end to end: counts, statuses, resume."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.cli import main
from images import bad_and_odd_images, encode, photo

SLOW_S = 4.0
TIMEOUT_S = 1


def served_files() -> dict[str, bytes]:
    files = {f"good_{i}.png": encode(photo(100 + i), "PNG") for i in range(6)}
    files |= {f"good_{i}.jpg": encode(photo(200 + i), "JPEG", quality=92) for i in range(4)}
    files |= {f"{name}.img": data for name, (data, _) in bad_and_odd_images().items()}
    files["slow.png"] = encode(photo(300), "PNG")
    return files


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.files:
            self.send_error(404)
            return
        if name.startswith("slow"):
            time.sleep(SLOW_S)
        body = self.files[name]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    _Handler.files = served_files()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def url_list(tmp: Path, base: str) -> tuple[Path, list[str]]:
    names = sorted(served_files()) + ["missing_1.png", "missing_2.jpg"]
    path = tmp / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{base}/img/{n}" for n in names],
                             "caption": [f"<b>caption</b> of {n}" for n in names]}), path)
    return path, names


def run_img2dataset(urls: Path, out: Path, output_format: str, reencode: bool) -> None:
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from img2dataset import download

    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
             output_format=output_format, output_folder=str(out), processes_count=1, thread_count=4,
             timeout=TIMEOUT_S, retries=0, number_sample_per_shard=8, image_size=32, resize_mode="no",
             disable_all_reencoding=not reencode, enable_wandb=False, distributor="multiprocessing")


def totals(out: Path) -> tuple[int, Counter[str], list[str]]:
    meta = pq.read_table(out / "metadata").to_pydict() if (out / "metadata").exists() else {"key": []}
    rejected = pq.read_table(out / "rejected").to_pydict()
    return len(meta["key"]), Counter(rejected["reason"]), meta.get("caption", [])


@pytest.fixture(scope="module")
def webdataset_reference(ray_local: str, image_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("i2d-wds")
    urls, names = url_list(tmp, image_server)
    run_img2dataset(urls, tmp / "shards", "webdataset", reencode=False)
    code = main(["reference", "embed", str(tmp / "shards"), str(tmp / "ref")])
    return {"tmp": tmp, "names": names, "code": code, "out": tmp / "ref"}


def test_webdataset_raw_bytes_every_row_is_embedded_or_rejected_with_a_reason(webdataset_reference: dict) -> None:
    out, names = webdataset_reference["out"], webdataset_reference["names"]
    assert webdataset_reference["code"] == 0
    embedded, reasons, captions = totals(out)
    cases = bad_and_odd_images()
    converted = [n for n, (_, err) in cases.items() if err is None]
    assert embedded == 10 + len(converted)  # the good ones and the odd-but-valid ones
    decode_failures = Counter(err for _, err in cases.values() if err is not None)
    # 404s and the slow server are img2dataset's failures; the rest are memaudit's decode reasons
    download = {k: v for k, v in reasons.items() if k not in decode_failures}
    assert {k: reasons[k] for k in decode_failures} == dict(decode_failures)
    assert sum(download.values()) == 3 and "failed_to_download" in download, reasons
    assert embedded + sum(reasons.values()) == len(names)
    assert all(c.startswith("<b>caption</b>") for c in captions)  # captions kept verbatim
    meta = pq.read_table(out / "metadata").to_pydict()
    notes = {url.rsplit("/", 1)[-1]: note for url, note in zip(meta["url"], meta["note"])}
    assert all(notes[f"{n}.img"] for n in converted)  # conversions are recorded per row
    emb = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    assert emb.dtype == np.float16 and emb.shape == (embedded, 768)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
    assert json.loads((out / "embedding.json").read_text())["model_id"] == "builtin:testbed-copy"


def test_reference_embed_resumes_per_shard(webdataset_reference: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tmp, out = webdataset_reference["tmp"], webdataset_reference["out"]
    before = {p: p.stat().st_mtime_ns for p in (out / "img_emb").glob("*.npy")}
    assert main(["reference", "embed", str(tmp / "shards"), str(out)]) == 0
    assert "0 embedded now" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "img_emb").glob("*.npy")} == before
    (out / "_markers" / "1.json").unlink()
    assert main(["reference", "embed", str(tmp / "shards"), str(out)]) == 0
    assert "1 embedded now" in capsys.readouterr().out
    changed = [p.name for p in before if p.stat().st_mtime_ns != before[p]]
    assert changed == ["img_emb_1.npy"]


def test_index_of_the_embedded_reference_finds_each_image(webdataset_reference: dict) -> None:
    from audit.reference.search import ReferenceIndex

    out = webdataset_reference["out"]
    assert main(["reference", "index", str(out)]) == 0
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    embedded, _, _ = totals(out)
    assert manifest["count"] == embedded and manifest["exact"]
    emb = np.concatenate([np.load(out / f["npy"]) for f in manifest["files"]]).astype(np.float32)
    _, rows = ReferenceIndex(out).search(emb, 1, model_id="builtin:testbed-copy")
    assert np.array_equal(rows[:, 0], np.arange(embedded))


def test_parquet_output_with_img2dataset_reencoding(ray_local: str, image_server: str, tmp_path: Path) -> None:
    urls, names = url_list(tmp_path, image_server)
    run_img2dataset(urls, tmp_path / "shards", "parquet", reencode=True)
    assert main(["reference", "embed", str(tmp_path / "shards"), str(tmp_path / "ref")]) == 0
    embedded, reasons, _ = totals(tmp_path / "ref")
    assert embedded + sum(reasons.values()) == len(names)
    assert embedded >= 10 and reasons  # img2dataset's own decoder rejects the broken ones before us


def test_embedding_folder_of_another_model_is_refused(webdataset_reference: dict, capsys: pytest.CaptureFixture[str]) -> None:
    tmp, out = webdataset_reference["tmp"], webdataset_reference["out"]
    ts = tmp / "other.pt"
    import torch

    torch.jit.script(torch.nn.Flatten()).save(str(ts))
    code = main(["reference", "embed", str(tmp / "shards"), str(out), "--set", "embedding.kind=torchscript",
                 "--set", f"embedding.model={ts}"])
    assert code == 2 and "was embedded with builtin:testbed-copy" in capsys.readouterr().err


def test_testbed_training_set_becomes_a_reference_set_with_one_command(ray_local: str, tmp_path: Path) -> None:
    from audit.prompts import most_duplicated
    from audit.reference.training_set import item_key

    out = tmp_path / "testbed-ref"
    assert main(["reference", "testbed", str(out)]) == 0
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    truth = pq.read_table(Path(__file__).parents[1] / "audit/testbed/trained/ground_truth.parquet").to_pydict()
    copies = dict(zip(truth["key"], truth["duplicates"]))
    assert manifest["count"] == sum(copies.values()) and manifest["embedding"]["model_id"] == "builtin:testbed-copy"
    ranked = most_duplicated(out).to_pydict()
    # every copy of an image duplicated k times has at least k-1 near-duplicates
    assert all(n >= copies[item_key(k)] - 1 for k, n in zip(ranked["key"], ranked["dup_count"]))
    top = {item_key(k) for k in ranked["key"][: 16 * 32]}
    assert all(copies[k] == 32 for k in top)  # Carlini's selection puts the 32x images first
