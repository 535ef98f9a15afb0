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


BASE_PREFIX = "base-"  # keys of the base testbed's pairs in the LoRA testbed's reference


def copy_key(item: TestbedItem, copy: int, prefix: str = "") -> str:
    return f"{prefix}{item.key}-{copy:02d}"


def item_key(reference_key: str) -> str:
    """The testbed item a reference key belongs to (drops the copy suffix)."""
    return reference_key.rsplit("-", 1)[0]


def write_training_set(items: list[TestbedItem], out: Path, rows_per_shard: int = 1000,
                       prefixed: tuple[list[TestbedItem], str] | None = None) -> Path:
    """Write the training set (with its duplicates) as img2dataset parquet shards under ``out``;
    ``prefixed`` adds another set whose keys start with a prefix (the base model's pairs under a
    fine-tuning set's)."""
    rows: dict[str, list[object]] = {"key": [], "url": [], "caption": [], "status": [], "error_message": [], "png": []}
    sets = [(items, ""), *([prefixed] if prefixed else [])]
    for item, prefix in ((item, prefix) for group, prefix in sets for item in group):
        buffer = io.BytesIO()
        Image.fromarray(item.image).save(buffer, format="PNG")
        for copy in range(item.duplicates):
            rows["key"].append(copy_key(item, copy, prefix))
            rows["url"].append(f"testbed://{prefix}{item.key}")
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
    """The training set of the shipped testbed ``name`` (``testbed`` or ``testbed-maps``; for
    ``testbed-lora``, the LoRA testbed's fine-tuning set and the base testbed's training set, keys
    ``base-...``: a reference holds everything the audited model was trained on), rebuilt from the
    seeds and specs in the testbeds' own metrics.json, as img2dataset shards under
    ``folder/img2dataset``."""
    import json

    from audit.testbed.checkpoints import LORA_TESTBED, lora_testbed_folder, shipped_folder
    from audit.testbed.dataset import build_dataset
    from audit.testbed.lora import BASE_TESTBED, finetune_items, recorded_spec
    from audit.testbed.train import spec_from_dict

    def training_items(shipped: str) -> list[TestbedItem]:
        spec = spec_from_dict(json.loads((shipped_folder(shipped) / "metrics.json").read_text())["training"]["spec"])
        return build_dataset(spec.dataset, spec.seed)

    if name == LORA_TESTBED:  # everything base + adapter was trained on; the base's keys prefixed
        return write_training_set(finetune_items(recorded_spec(lora_testbed_folder())), folder / SOURCE_DIR,
                                  prefixed=(training_items(BASE_TESTBED), BASE_PREFIX))
    return write_training_set(training_items(name), folder / SOURCE_DIR)
