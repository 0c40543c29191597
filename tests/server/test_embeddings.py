"""The embedding-collapse indicator: mean pairwise cosine of the volume and report embeddings."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from server.evaluation.embeddings import COLLAPSE_COSINE, embedding_spread, mean_pairwise_cosine


def brute_force(x: np.ndarray) -> float:
    cosines = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in itertools.permutations(x, 2)]
    return float(np.mean(cosines))


@pytest.mark.parametrize("n, e, offset", [(2, 3, 0.0), (7, 16, 0.0), (30, 8, 1.5), (5, 4, -3.0)])
def test_mean_pairwise_cosine_is_the_mean_over_distinct_pairs(n, e, offset):
    x = np.random.default_rng(n).normal(size=(n, e)) * np.random.default_rng(e).uniform(0.1, 5, size=(n, 1)) + offset
    assert mean_pairwise_cosine(x) == pytest.approx(brute_force(x), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_identical_rows_are_a_collapse(dtype):
    row = np.random.default_rng(0).normal(size=(1, 12))
    x = (row * np.arange(1, 6)[:, None]).astype(dtype)  # one direction, rows of any length
    assert mean_pairwise_cosine(x) == pytest.approx(1.0, abs=1e-6)
    spread = embedding_spread(x, np.random.default_rng(1).normal(size=(5, 12)))
    assert spread["embeddings.volume_mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert spread["embeddings.text_mean_cosine"] < COLLAPSE_COSINE
    assert spread["embeddings.collapsed"] == 1.0


def test_opposite_rows_give_minus_one_and_spread_rows_do_not_collapse():
    x = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine(x) == pytest.approx(-1.0)
    spread = embedding_spread(np.eye(4), np.eye(4))  # orthogonal: mean cosine 0
    assert spread == {"embeddings.volume_mean_cosine": pytest.approx(0.0, abs=1e-12),
                      "embeddings.text_mean_cosine": pytest.approx(0.0, abs=1e-12), "embeddings.collapsed": 0.0}


@pytest.mark.parametrize("collapsed_side", ["volume", "text"])
def test_either_side_collapsing_sets_the_flag(collapsed_side):
    spread_out = np.random.default_rng(0).normal(size=(6, 8))
    near_one = np.ones((6, 8)) + 1e-4 * np.random.default_rng(1).normal(size=(6, 8))
    volume, text = (near_one, spread_out) if collapsed_side == "volume" else (spread_out, near_one)
    result = embedding_spread(volume, text)
    assert result[f"embeddings.{collapsed_side}_mean_cosine"] > COLLAPSE_COSINE
    assert result["embeddings.collapsed"] == 1.0


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_rows_have_no_pairs(n):
    assert mean_pairwise_cosine(np.ones((n, 4))) is None
    result = embedding_spread(np.ones((n, 4)), np.ones((n, 4)))
    assert result["embeddings.volume_mean_cosine"] is None and result["embeddings.text_mean_cosine"] is None
    assert result["embeddings.collapsed"] == 0.0


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"embeddings should be \[N, E\], got shape"):
        mean_pairwise_cosine(np.ones(shape))


def test_a_zero_row_does_not_divide_by_zero():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # the zero row counts as orthogonal to every other row: only the (1, 0)-(0, 1) pair, cosine 0
    assert mean_pairwise_cosine(x) == pytest.approx(0.0)
