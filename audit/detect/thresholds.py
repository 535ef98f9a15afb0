"""The thresholds detection applies, and the false-label rates that come with them (pure).

Two sources (``detection.calibration``, docs/calibration.md):

- ``calibrated`` (default): thresholds are false-label rates on the reference's own null
  (:mod:`audit.reference.calibration`): the tiled-L2 threshold is the ``match_fpr`` quantile of
  each training image's closest distinct training image, the split-product threshold the
  ``1 - template_fpr`` quantile of its best split-product; a pair whose structures sum to less
  than the tiled-L2 threshold is ``low_information``, never verbatim.
- ``paper``: Carlini et al.'s tiled L2 0.15 and Somepalli et al.'s split-product 0.5 as
  configured (``match_l2``, ``template_similarity``), no low-information rule: the papers'
  verdicts, for reproducing their tables.

Either way, the per-sample rate of a false verbatim label at the thresholds in use is measured on
the null when the reference has a calibration (its one-sided 95% upper bound feeds the flag test
in :mod:`audit.detect.scores`), else assumed to be the configured ``match_fpr``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from audit.config import DetectionSection, ReferenceSection
from audit.errors import InputError

log = logging.getLogger(__name__)
CALIBRATED, PAPER = "calibrated", "paper"


@dataclass(frozen=True)
class Rate:
    """A false-label rate per sample: measured on the null (count of n) or assumed."""

    rate: float
    upper: float  # one-sided 95% upper bound (Clopper-Pearson); the assumed rate when not measured
    count: int = 0
    of: int = 0

    @property
    def measured(self) -> bool:
        return self.of > 0


@dataclass(frozen=True)
class Thresholds:
    """What detection applies to every pair, and what false labels alone would produce."""

    source: str  # CALIBRATED or PAPER
    match_l2: float  # tiled L2 below which a pair is a pixel copy
    template_similarity: float  # split-product at or above which a non-copy pair is a template copy
    clique_delta: float  # tiled L2 below which two samples of one prompt are the same
    low_information: bool  # pairs whose structures sum below match_l2 are low_information
    verbatim_rate: Rate  # per sample: a false matching/retrieved label
    template_rate: Rate  # per sample: a false template label
    pair_rate: Rate  # per pair of distinct images: tiled L2 below clique_delta
    flag_fpr: float  # false-flag rate per prompt the flag test is run at
    calibration: dict[str, Any] | None  # the calibration's record (None: rates assumed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Thresholds:
        """The inverse of :meth:`to_json` (a service's deployments receive the driver's thresholds)."""
        rates = {k: Rate(**data[k]) for k in ("verbatim_rate", "template_rate", "pair_rate")}
        return cls(**{**data, **rates})

    def digest(self) -> str:
        """Identifies the verdicts these thresholds give (detection shards record it)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def paper(det: DetectionSection) -> Thresholds:
    """The papers' constants; rates assumed (no calibration at hand)."""
    assumed = Rate(det.match_fpr, det.match_fpr)
    return Thresholds(PAPER, det.match_l2, det.template_similarity, det.clique_delta, False, assumed,
                      Rate(det.template_fpr, det.template_fpr), assumed, det.flag_fpr, None)


def resolve(det: DetectionSection, null: Any | None) -> Thresholds:
    """The thresholds for ``det``, from ``null`` (an :class:`audit.reference.calibration.Null`,
    or None without a calibration: allowed in paper mode only)."""
    if null is None:
        if det.calibration == CALIBRATED:
            raise InputError("detection.calibration is 'calibrated' but the reference has no calibration; run "
                             "`memaudit reference calibrate REF`, or set detection.calibration: paper")
        return paper(det)
    calibrated = det.calibration == CALIBRATED
    pixels = _with_pixels(null)  # pixel rates over the sampled images that have images
    closest = np.min(pixels.tiled_l2, axis=1) if pixels.size else np.zeros(0)
    match_l2 = lower_cut(closest, det.match_fpr) if calibrated and closest.size \
        else det.match_l2
    best_split = np.max(null.split_product, axis=1)
    template = upper_cut(best_split, det.template_fpr) if calibrated else det.template_similarity
    verbatim = _copies(pixels, match_l2, calibrated)
    template_hits = best_split >= template
    if pixels.size == null.size:  # a template label needs the pair not to be a pixel copy
        template_hits &= ~verbatim
    return Thresholds(
        CALIBRATED if calibrated else PAPER, match_l2, template, det.clique_delta, calibrated,
        _rate(verbatim) if pixels.size else Rate(det.match_fpr, det.match_fpr),
        _rate(template_hits),
        _rate(_copies(pixels, det.clique_delta, calibrated)) if pixels.size else Rate(det.match_fpr, det.match_fpr),
        det.flag_fpr, null.record,
    )


def lower_cut(values: np.ndarray, rate: float) -> float:
    """The largest threshold with at most ``floor(rate * n)`` of ``values`` strictly below it (a
    distance under which distinct images fall at most at ``rate``; ties never push it over)."""
    ordered = np.sort(values)
    return float(ordered[min(int(rate * ordered.size), ordered.size - 1)])


def upper_cut(values: np.ndarray, rate: float) -> float:
    """The smallest threshold with at most ``floor(rate * n)`` of ``values`` at or above it."""
    ordered = np.sort(values)
    allowed = int(rate * ordered.size)
    return float(np.nextafter(ordered[ordered.size - allowed - 1], np.inf))


def _with_pixels(null: Any) -> Any:
    """The null entries whose pairs were all measured on pixels."""
    keep = np.isfinite(null.tiled_l2).all(axis=1)
    return replace(null, cosine=null.cosine[keep], split_product=null.split_product[keep],
                   tiled_l2=null.tiled_l2[keep], rms=null.rms[keep], structure=null.structure[keep],
                   neighbor_structure=null.neighbor_structure[keep])


def _copies(null: Any, threshold: float, low_information: bool) -> np.ndarray:
    """Per null entry: would any of its pairs be labelled a pixel copy at ``threshold``."""
    below = null.tiled_l2 < threshold
    if low_information:
        below &= (null.structure[:, None] + null.neighbor_structure) >= threshold
    return below.any(axis=1)


def _rate(hits: np.ndarray) -> Rate:
    count, n = int(hits.sum()), int(hits.size)
    upper = float(binomtest(count, n).proportion_ci(confidence_level=0.90, method="exact").high)
    return Rate(count / n, upper, count, n)


def for_audit(det: DetectionSection, ref: ReferenceSection, reference: Path | None, model_id: str | None,
              publish: Callable[[Path], None] | None = None, owned: bool = False,
              hold: Callable[[], AbstractContextManager[object]] | None = None) -> Thresholds:
    """The thresholds of an audit against the prepared ``reference`` folder (None: no reference,
    only cliques apply): its calibration, measured now when it has none and the mode is
    calibrated (``publish`` uploads the written files of an object-store reference). A stale
    calibration is refused, except in a reference memaudit ``owned`` (a built-in one in the
    cache), which is measured again. ``hold``: entered only when the calibration is to be written
    (the reference folder's lease; a read-only reference is never written nor leased)."""
    from audit.reference.calibration import (CALIBRATION_JSON, NULL_FILE, calibrate, calibration_dir, describe,
                                             load_calibration, remove_calibration)

    if reference is None:
        return paper(det)

    def current() -> tuple[Any, bool]:
        try:
            found = load_calibration(reference, det, model_id)
        except InputError:
            if not owned:
                raise
            return None, det.calibration == CALIBRATED
        return found, found is None and det.calibration == CALIBRATED

    null, to_write = current()
    if to_write:
        with hold() if hold is not None else nullcontext():
            null, to_write = current()  # another writer may have measured it while this one waited
            if to_write:
                log.info("calibrating %s (none, or one for other settings)", reference)
                remove_calibration(reference)
                log.info("calibration: %s", describe(calibrate(reference, det, ref)))
                if publish is not None:
                    for name in (NULL_FILE, CALIBRATION_JSON):  # the record last: it marks the calibration complete
                        publish(calibration_dir(reference) / name)
                null = load_calibration(reference, det, model_id)
    return resolve(det, null)
