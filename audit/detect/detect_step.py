"""The detection step for one plan shard: cliques, verification, prompt scores (Ray-free).

Reads the samples, embeddings and neighbors of the shard's samples shards (one, or one per round
of an adaptive run; docs/screening.md), writes ``matches/`` (every verified pair with its measures
and label) and ``prompt_scores/`` (one row per prompt, and in a screened run one per prompt the
screen decided), each published atomically with its marker.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from audit import layout
from audit.config import AuditConfig
from audit.detect import verify
from audit.detect.cliques import copy_graph, largest_clique
from audit.detect.scores import clique_min, flag_p_value, memorization_score
from audit.detect.thresholds import Thresholds
from audit.embed.storage import decode_embeddings
from audit.location import Location
from audit.reference.images import ReferenceImages
from audit.reference.index import INDEX_DIR, load_manifest
from audit.reference.locate import resolve_reference
from audit.reference.vectors import VectorStore
from audit.schema import MATCHES, PROMPT_SCORES, STATUS_ERROR, STATUS_OK
from audit.similarity import common_size, pairwise_tiled_l2, tile_structure
from audit.lease import LeaseCheck
from audit.store import RunStore

log = logging.getLogger(__name__)


def input_tables(cfg: AuditConfig) -> tuple[str, ...]:
    """The tables a plan shard's detection reads: their shards' sha256 are among its ``inputs``."""
    if cfg.reference.path:
        return layout.SAMPLES, layout.EMBEDDINGS, layout.NEIGHBORS
    return layout.SAMPLES, layout.EMBEDDINGS


def settings_inputs(cfg: AuditConfig, thresholds: Thresholds) -> dict[str, str]:
    """The settings every detection shard's ``inputs`` record besides its input shards: digests of
    the ``detection`` section and of the thresholds applied (a change of either redoes detection)."""
    section = json.dumps(cfg.detection.model_dump(mode="json"), sort_keys=True).encode()
    return {"detection": hashlib.sha256(section).hexdigest()[:16], "thresholds": thresholds.digest()}


@dataclass(frozen=True)
class DetectTask:
    """One plan shard to detect on: ``parts`` are its samples shards (its rounds, in order; none
    when the screen decided all its prompts), ``screened`` the escalation rows of its prompts
    (None: the run is not screened), ``inputs`` what the outputs are computed from."""

    shard: str
    inputs: dict[str, str]
    parts: tuple[str, ...]
    screened: list[dict[str, Any]] | None = None


class DetectStep:
    """The detection step: holds what every shard needs (the config, the planned prompts, the
    reference vectors and images, the thresholds resolved once for the run by the driver); a task
    ``(shard, inputs)`` writes that shard's ``matches/`` and then its ``prompt_scores/`` (whose
    marker means "detection done for this shard")."""

    def __init__(self, cfg: AuditConfig, run: Location, thresholds: Thresholds, device: str = "cpu",
                 lease: LeaseCheck | None = None):
        self.cfg, self.store, self.device, self.thresholds = cfg, RunStore(run, lease), device, thresholds
        reference = resolve_reference(cfg.reference.path) if cfg.reference.path else None
        self.det = cfg.detection
        prompts = pq.read_table(self.store.readable_file(layout.prompts_file()), columns=["prompt_id", "prompt", "key"])
        self.prompts = {p: (t, k) for p, t, k in zip(*(prompts.column(c).to_pylist() for c in ("prompt_id", "prompt", "key")))}
        self.vectors = self.images = None
        if reference is not None:
            manifest = load_manifest(reference / INDEX_DIR)
            files = manifest["files"]
            self.vectors = VectorStore([reference / f["npy"] for f in files], [f["first_row"] for f in files])
            self.images = ReferenceImages(reference, manifest)

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "reference": self.images is not None, "thresholds": self.thresholds.source}

    def run(self, task: DetectTask) -> dict[str, Any]:
        shard, inputs = task.shard, task.inputs
        score_rows: list[dict[str, Any]] = []
        self.store.invalidate(layout.MATCHES, shard)
        self.store.invalidate(layout.PROMPT_SCORES, shard)
        with self.store.open_shard(layout.MATCHES, shard, MATCHES) as matches:
            if task.parts:
                self._detect_shard(task.parts, score_rows, matches.write)
            matches.commit(inputs=inputs)
        if task.screened is not None:
            score_rows = screened_rows(score_rows, task.screened, self.det.clique_min)
        # prompt_scores is published last: its marker means "detection done for this shard"
        with self.store.open_shard(layout.PROMPT_SCORES, shard, PROMPT_SCORES) as scores:
            scores.write({name: [r.get(name) for r in score_rows] for name in PROMPT_SCORES.names})
            return scores.commit(inputs=inputs)

    def _detect_shard(self, parts: tuple[str, ...], score_rows: list[dict[str, Any]], write: Any) -> None:
        """Detection over every samples shard of a plan shard (its rounds, in order)."""
        columns = ["sample_id", "prompt_id", "image_png", "noise_magnitude", "status"]
        samples = pa.concat_tables([pq.read_table(self.store.readable(layout.SAMPLES, part), columns=columns)
                                    for part in parts]).to_pydict()
        sample_emb: dict[str, np.ndarray] = {}
        neighbors: dict[str, list[tuple[int, int, str | None, float]]] = defaultdict(list)
        for part in parts:
            embeddings = pq.read_table(self.store.readable(layout.EMBEDDINGS, part))
            dim = int(embeddings.schema.field("embedding").metadata[b"dim"])
            sample_emb.update(zip(embeddings.column("sample_id").to_pylist(),
                                  decode_embeddings(embeddings.column("embedding"), dim)))
            neighbors.update(self._neighbors(part))
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for i, prompt_id in enumerate(samples["prompt_id"]):
            by_prompt[prompt_id].append(i)
        for prompt_id, members in by_prompt.items():
            pairs: list[dict[str, Any]] = []
            score_rows.append(self._prompt(prompt_id, members, samples, sample_emb, neighbors, pairs))
            if pairs:
                write({name: [p[name] for p in pairs] for name in MATCHES.names})

    def _neighbors(self, shard: str) -> dict[str, list[tuple[int, int, str | None, float]]]:
        out: dict[str, list[tuple[int, int, str | None, float]]] = defaultdict(list)
        path = self.store.readable(layout.NEIGHBORS, shard)
        if not path.exists():
            return out
        table = pq.read_table(path, columns=["sample_id", "rank", "row", "key", "score"]).to_pydict()
        for sid, rank, row, key, score in zip(table["sample_id"], table["rank"], table["row"], table["key"], table["score"]):
            out[sid].append((rank, row, key, score))
        return out

    def _prompt(self, prompt_id: str, members: list[int], samples: dict[str, list[Any]], sample_emb: dict[str, np.ndarray],
                neighbors: dict[str, list[tuple[int, int, str | None, float]]], pairs: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [i for i in members if samples["status"][i] == STATUS_OK]
        minimum = clique_min(self.det.clique_min, len(members))
        row: dict[str, Any] = {"prompt_id": prompt_id, "n_samples": len(members), "clique_min": minimum,
                               "status": STATUS_OK, "error": None}
        noise = [samples["noise_magnitude"][i] for i in ok]
        row["noise_magnitude"] = float(np.nanmean(noise)) if noise and not np.all(np.isnan(noise)) else None
        clique = self._clique([samples["image_png"][i] for i in ok])
        row.update(clique_size=clique.size, clique_exact=clique.exact, clique_upper=clique.upper_bound)
        prompt, prompt_key = self.prompts.get(prompt_id, ("", None))
        best_label: dict[str, str] = {}
        cosines, splits, l2s = [], [], []
        for i in ok:
            sid = samples["sample_id"][i]
            found = sorted(neighbors.get(sid, []))
            if found:
                cosines.append(found[0][3])
            for rank, ref_row, key, _ in found[: self.det.verify_top]:
                pair = self._verify(sid, prompt_id, rank, ref_row, key, samples["image_png"][i], sample_emb.get(sid),
                                    prompt, prompt_key)
                pairs.append(pair)
                if pair["status"] == STATUS_OK:
                    splits.append(pair["split_product"])
                    if pair["label"] != verify.LOW_INFORMATION:  # its distance says nothing
                        l2s.append(pair["tiled_l2"])
                    if verify.LABEL_ORDER[pair["label"]] > verify.LABEL_ORDER[best_label.get(sid, verify.NONE)]:
                        best_label[sid] = pair["label"]
        labels = list(best_label.values())
        explained = self._explained_by_other_images(ok, samples, best_label, pairs, neighbors)
        clique_own = [m for m in clique.members if samples["sample_id"][ok[m]] not in explained]
        row.update(best_cosine=max(cosines) if cosines else None, best_split_product=max(splits) if splits else None,
                   min_tiled_l2=min(l2s) if l2s else None, n_matching=labels.count(verify.MATCHING),
                   n_retrieved=labels.count(verify.RETRIEVED), n_template=labels.count(verify.TEMPLATE),
                   n_low_information=labels.count(verify.LOW_INFORMATION))
        row["score"] = memorization_score(len(members), row["n_matching"], len(clique_own), minimum)
        row["p_value"] = flag_p_value(len(ok), row["n_matching"], len(clique_own), minimum,
                                      self.thresholds.verbatim_rate.upper, self.thresholds.pair_rate.upper)
        row["flagged"] = row["p_value"] <= self.thresholds.flag_fpr
        return row

    def _explained_by_other_images(self, ok: list[int], samples: dict[str, list[Any]], best_label: dict[str, str],
                                   pairs: list[dict[str, Any]],
                                   neighbors: dict[str, list[tuple[int, int, str | None, float]]]) -> set[str]:
        """Samples that are evidence about *another* training image's caption, not this prompt's
        (Webster's retrieved verbatim): those verified as copies of another training image, and
        those whose nearest training image is one of those images (or a near-duplicate of one,
        cosine >= ``reference.dup_threshold``) — the rest of a clique around a retrieved image,
        too far from it to pass verification. Without a reference set nothing is explained."""
        retrieved = {samples["sample_id"][i] for i in ok if best_label.get(samples["sample_id"][i]) == verify.RETRIEVED}
        if self.vectors is None:
            return retrieved
        # With a reference set, a clique counts for this prompt only around its own training image:
        # samples none of whose verified neighbours is the prompt's own image are not its evidence
        # (a held-out caption whose samples keep falling back on one unverified image).
        near_own = {p["sample_id"] for p in pairs if p["own"] and p["status"] == STATUS_OK}
        retrieved |= {samples["sample_id"][i] for i in ok if samples["sample_id"][i] not in near_own}
        targets = sorted({p["row"] for p in pairs if p["label"] == verify.RETRIEVED})
        if not targets:
            return retrieved
        target_vectors = self.vectors.get(np.array(targets, np.int64)).astype(np.float32)
        explained = set(retrieved)
        for i in ok:
            sid = samples["sample_id"][i]
            found = sorted(neighbors.get(sid, []))
            if sid in explained or not found or found[0][1] < 0:
                continue
            nearest = self.vectors.get(np.array([found[0][1]], np.int64)).astype(np.float32)[0]
            if float(np.max(target_vectors @ nearest)) >= self.cfg.reference.dup_threshold:
                explained.add(sid)
        return explained

    def _clique(self, pngs: list[bytes]) -> Any:
        """The largest clique of samples within ``clique_delta`` of each other; with calibrated
        thresholds, pairs too flat to compare (structures summing below the distance) are no edge."""
        if len(pngs) < 2:
            return largest_clique(np.zeros((len(pngs), len(pngs)), bool))
        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
        side = common_size(images[0].size, images[0].size, self.det.verify_size, self.det.tile_grid)
        stack = np.stack([np.asarray(im if im.size == (side, side) else im.resize((side, side))) for im in images])
        if self.device == "cpu":
            distances = pairwise_tiled_l2(stack, self.det.tile_grid)
        else:
            from audit.detect.gpu import pairwise_tiled_l2_torch

            distances = pairwise_tiled_l2_torch(stack, self.det.tile_grid, self.device)
        delta = self.thresholds.clique_delta
        graph = copy_graph(distances, delta)
        if self.thresholds.low_information:
            structure = tile_structure(stack, self.det.tile_grid)
            graph &= (structure[:, None] + structure[None, :]) >= delta
        return largest_clique(graph)

    def _verify(self, sid: str, prompt_id: str, rank: int, ref_row: int, key: str | None, png: bytes,
                emb: np.ndarray | None, prompt: str, prompt_key: str | None) -> dict[str, Any]:
        pair: dict[str, Any] = {"sample_id": sid, "prompt_id": prompt_id, "rank": rank, "row": ref_row, "key": key,
                                "own": False, "tiled_l2": None, "rms": None, "cosine": None, "split_product": None,
                                "structure_sum": None,
                                "label": verify.NONE, "status": STATUS_OK, "error": None}
        if self.images is None or self.vectors is None:
            return pair | {"status": STATUS_ERROR, "error": "no reference set configured (reference.path)"}
        ref_key, caption, ref_png = self.images.get(np.array([ref_row]))[ref_row]
        pair["key"] = ref_key
        pair["own"] = verify.is_own(prompt, prompt_key, caption, ref_key)
        if ref_png is None or emb is None:
            why = "reference image not available (precomputed embeddings without images)" if ref_png is None \
                else "sample has no embedding"
            return pair | {"status": STATUS_ERROR, "error": why}
        measures = verify.compare(png, ref_png, emb, self.vectors.get(np.array([ref_row]))[0], self.det)
        pair.update({k: measures[k] for k in ("tiled_l2", "rms", "cosine", "split_product", "structure_sum")})
        pair["label"] = verify.label(measures, pair["own"], self.thresholds)
        return pair


def screened_rows(audited: list[dict[str, Any]], screened: list[dict[str, Any]],
                  clique_min_setting: int | str) -> list[dict[str, Any]]:
    """The prompt_scores rows of a screened shard, in the screen's prompt order: audited prompts
    with their screen columns added, and a row for each prompt the screen decided (not escalated:
    no samples, not flagged; docs/screening.md)."""
    by_id = {r["prompt_id"]: r for r in audited}
    out = []
    for entry in screened:
        screen = {"screen_score": entry["screen_score"], "screen_noise_magnitude": entry["noise_magnitude"],
                  "screen_alignment": entry["alignment"], "screen_latent_update": entry["latent_update"],
                  "escalated": entry["escalated"],
                  "escalation": entry["escalation"]}
        row = by_id.get(entry["prompt_id"])
        if row is None:
            row = {"prompt_id": entry["prompt_id"], "n_samples": 0, "noise_magnitude": None, "clique_size": 0,
                   "clique_exact": True, "clique_upper": 0, "clique_min": clique_min(clique_min_setting, 0),
                   "n_matching": 0, "n_retrieved": 0, "n_template": 0, "n_low_information": 0, "score": 0.0,
                   "p_value": 1.0, "flagged": False, "status": STATUS_OK, "error": None}
        out.append(row | screen)
    return out
