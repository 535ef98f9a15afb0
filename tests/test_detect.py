"""Detection's pure parts: pairwise tiled L2, cliques, split-product, labels, scores."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from audit.config import DetectionSection
from audit.detect import thresholds, verify
from audit.detect.cliques import copy_graph, largest_clique
from audit.detect.join import check_compatible, query_groups
from audit.detect.scores import clique_min, memorization_score
from audit.errors import InputError
from audit.similarity import pairwise_tiled_l2, split_product, tiled_l2
from images import photo


def diverse(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.stack([np.asarray(photo(seed * 1000 + i, size)) for i in range(n)])


def test_pairwise_tiled_l2_equals_the_pairwise_definition() -> None:
    images = diverse(7, 1)
    matrix = pairwise_tiled_l2(images, block=3)
    for i, j in itertools.product(range(7), repeat=2):
        assert matrix[i, j] == pytest.approx(float(tiled_l2(images[i], images[j])), abs=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_accelerator_pairwise_tiled_l2_equals_the_numpy_one(device: str) -> None:
    from audit.detect.gpu import pairwise_tiled_l2_torch

    images = np.concatenate([diverse(9, 2), np.repeat(diverse(1, 3), 3, axis=0)])  # with exact copies
    expected = pairwise_tiled_l2(images)
    found = pairwise_tiled_l2_torch(images, device=device, block=4)
    # Both expand |a-b|² = |a|² + |b|² - 2ab in float32: near 0 the cancellation leaves ~1e-7 of
    # the norms, which the square root turns into up to ~1e-3 (kernel choice moves it; distances
    # between different images here are 0.4-0.6)
    assert found.shape == (12, 12) and np.allclose(found, expected, atol=1e-3)
    assert np.all(np.diag(found) == 0) and np.allclose(found[9:, 9:], 0, atol=1e-3)


def test_planted_near_identical_group_is_the_largest_clique() -> None:
    rng = np.random.default_rng(0)
    images = diverse(20, 2).astype(np.int16)
    group = [2, 5, 9, 11, 14, 17]
    for i in group:  # copies of image 2 with a little noise, as a memorized prompt regenerates it
        images[i] = np.clip(images[2] + rng.integers(-6, 7, images[2].shape), 0, 255)
    clique = largest_clique(copy_graph(pairwise_tiled_l2(images.astype(np.uint8)), 0.15))
    assert clique.members == tuple(group) and clique.exact


def test_diverse_samples_form_no_group() -> None:
    clique = largest_clique(copy_graph(pairwise_tiled_l2(diverse(30, 3)), 0.15))
    assert clique.size == 1 and clique.exact


def test_largest_clique_is_exact_on_random_graphs() -> None:
    rng = np.random.default_rng(4)
    for _ in range(100):
        n = int(rng.integers(1, 10))
        adjacency = np.triu(rng.random((n, n)) < rng.random(), 1)
        adjacency = adjacency | adjacency.T
        best = max((len(c) for r in range(n, 0, -1) for c in itertools.combinations(range(n), r)
                    if all(adjacency[a, b] for a, b in itertools.combinations(c, 2))), default=0)
        clique = largest_clique(adjacency)
        assert clique.size == best and clique.exact


def test_exhausted_budget_reports_a_bound() -> None:
    rng = np.random.default_rng(5)
    adjacency = np.triu(rng.random((120, 120)) < 0.5, 1)
    adjacency = adjacency | adjacency.T
    clique = largest_clique(adjacency, budget=3)
    assert not clique.exact and clique.upper_bound >= clique.size
    assert all(adjacency[a, b] for a, b in itertools.combinations(clique.members, 2))


def test_split_product_catches_a_pasted_object_that_cosine_misses() -> None:
    from audit.config import EmbeddingSection
    from audit.embed.models import load_embedder
    from PIL import Image

    a, b = diverse(2, 6)
    obj = np.asarray(photo(77, 8)) // 2 + 120  # an 8x8 object, pasted into one tile of each image
    a, b = a.copy(), b.copy()
    a[0:8, 0:8] = obj
    b[0:8, 0:8] = obj
    embedder = load_embedder(EmbeddingSection(device="cpu"))
    ea, eb = embedder.embed_images([Image.fromarray(a), Image.fromarray(b)])
    full = float(ea @ eb)
    split = float(split_product(ea, eb, chunks=16))
    assert full < 0.5 < 0.9 < split, (full, split)


def test_labels_follow_webster() -> None:
    paper = thresholds.paper(DetectionSection())
    def measures(tiled: float, split: float, structure: float = 0.5) -> dict[str, float]:
        return {"tiled_l2": tiled, "split_product": split, "structure_sum": structure}
    assert verify.label(measures(0.05, 0.99), True, paper) == verify.MATCHING
    assert verify.label(measures(0.05, 0.99), False, paper) == verify.RETRIEVED
    assert verify.label(measures(0.40, 0.80), False, paper) == verify.TEMPLATE
    assert verify.label(measures(0.40, 0.20), True, paper) == verify.NONE
    # the papers' constants have no low-information rule; calibrated thresholds do
    assert verify.label(measures(0.05, 0.99, 0.02), True, paper) == verify.MATCHING
    calibrated = dataclasses.replace(paper, source=thresholds.CALIBRATED, low_information=True)
    assert verify.label(measures(0.05, 0.99, 0.02), True, calibrated) == verify.LOW_INFORMATION
    assert verify.label(measures(0.05, 0.99, 0.40), True, calibrated) == verify.MATCHING
    assert verify.is_own("A  red fox", None, "a red fox".replace("a", "A", 1), "k1")
    assert verify.is_own("anything", "k7", "other caption", "k7")
    assert not verify.is_own("a red fox", "k1", "a blue car", "k2")


def test_scores_and_clique_threshold() -> None:
    assert clique_min("auto", 500) == 10 and clique_min("auto", 4) == 3 and clique_min(7, 4) == 7
    assert memorization_score(4, 3, 0, 3) == 0.75
    assert memorization_score(4, 0, 4, 3) == 1.0
    assert memorization_score(4, 1, 2, 3) == 0.25  # a clique under the minimum does not count


def test_mismatched_embeddings_are_refused() -> None:
    manifest = {"embedding": {"model_id": "open_clip:ViT-L-14:openai", "dim": 768}}
    check_compatible(manifest, "open_clip:ViT-L-14:openai", 768, "ref")
    with pytest.raises(InputError, match="dim 512 but the reference index has 768"):
        check_compatible(manifest, "open_clip:ViT-B-32:openai", 512, "ref")
    with pytest.raises(InputError, match="embedded with builtin:testbed-copy but the reference index with open_clip"):
        check_compatible(manifest, "builtin:testbed-copy", 768, "ref")


def test_query_groups_reach_the_batch_size() -> None:
    assert query_groups({"a": 100, "b": 100, "c": 100, "d": 50}, 256) == [["a", "b", "c"], ["d"]]
    assert query_groups({"a": 1000}, 256) == [["a"]]
