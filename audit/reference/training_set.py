"""The testbed's training set as an img2dataset output folder (parquet format).

Every training pair is written as often as it occurs in training (a pair duplicated 32x is 32
rows, keys ``<item key>-<copy>``), exactly as duplicates occur in LAION; held-out pairs are left
out. `memaudit reference testbed OUT` then embeds and indexes it like any other reference set.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from audit.testbed.dataset import TestbedItem

SOURCE_DIR = "img2dataset"


def copy_key(item: TestbedItem, copy: int) -> str:
    return f"{item.key}-{copy:02d}"


def item_key(reference_key: str) -> str:
    """The testbed item a reference key belongs to (drops the copy suffix)."""
    return reference_key.rsplit("-", 1)[0]


def write_training_set(items: list[TestbedItem], out: Path, rows_per_shard: int = 1000) -> Path:
    """Write the training set (with its duplicates) as img2dataset parquet shards under ``out``."""
    rows: dict[str, list[object]] = {"key": [], "url": [], "caption": [], "status": [], "error_message": [], "png": []}
    for item in items:
        buffer = io.BytesIO()
        Image.fromarray(item.image).save(buffer, format="PNG")
        for copy in range(item.duplicates):
            rows["key"].append(copy_key(item, copy))
            rows["url"].append(f"testbed://{item.key}")
            rows["caption"].append(item.caption)
            rows["status"].append("success")
            rows["error_message"].append(None)
            rows["png"].append(buffer.getvalue())
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table(rows)
    for shard, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        pq.write_table(table.slice(start, rows_per_shard), out / f"{shard:05d}.parquet")
    return out


def write_shipped_training_set(folder: Path, name: str = "testbed") -> Path:
    """The training set of the shipped testbed ``name`` (``testbed`` or ``testbed-maps``), rebuilt
    from the seed and spec in that testbed's own metrics.json, as img2dataset shards under
    ``folder/img2dataset``."""
    import json

    from audit.testbed.checkpoints import shipped_folder
    from audit.testbed.dataset import build_dataset
    from audit.testbed.train import spec_from_dict

    spec = spec_from_dict(json.loads((shipped_folder(name) / "metrics.json").read_text())["training"]["spec"])
    return write_training_set(build_dataset(spec.dataset, spec.seed), folder / SOURCE_DIR)
