"""Retrieval recalls on a hand-made case whose ranks are set by construction."""

from __future__ import annotations

import numpy as np
import pytest

from engine.retrieval_eval import itm_eval

NUM_IMAGES = 12  # two captions each: captions 2i and 2i + 1 describe image i
# the rank at which each image finds its first caption (of 24), and each caption its image (of 12)
TEXT_RANKS = [0, 0, 0, 1, 2, 4, 5, 7, 9, 10, 15, 22]
IMAGE_RANKS = [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 11, 11, 11, 3, 0, 9, 2]


def _row(size: int, wanted: list[int], rank: int) -> np.ndarray:
    """Scores that put ``wanted[0]`` at position ``rank``, the other wanted items last, and everything
    else, in index order, around them (position p scores ``size - p``)."""
    others = [k for k in range(size) if k not in wanted]
    order = others[:rank] + wanted[:1] + others[rank:] + wanted[1:]
    row = np.zeros(size)
    row[order] = size - np.arange(size)
    return row


def test_itm_eval_on_ranks_set_by_construction():
    captions = [[2 * i, 2 * i + 1] for i in range(NUM_IMAGES)]
    scores_i2t = np.stack([_row(2 * NUM_IMAGES, captions[i], rank) for i, rank in enumerate(TEXT_RANKS)])
    scores_t2i = np.stack([_row(NUM_IMAGES, [t // 2], rank) for t, rank in enumerate(IMAGE_RANKS)])
    for i, rank in enumerate(TEXT_RANKS):  # the construction does what it says
        order = list(np.argsort(-scores_i2t[i]))
        assert min(order.index(c) for c in captions[i]) == rank
    result = itm_eval(scores_i2t, scores_t2i, [t // 2 for t in range(2 * NUM_IMAGES)], captions)

    # text retrieval: ranks below 1, 5 and 10 for 3, 6 and 9 of the 12 images
    assert (result["txt_r1"], result["txt_r5"], result["txt_r10"]) == (25.0, 50.0, 75.0)
    # image retrieval: 7, 13 and 19 of the 24 captions
    assert result["img_r1"] == pytest.approx(100 * 7 / 24)
    assert result["img_r5"] == pytest.approx(100 * 13 / 24)
    assert result["img_r10"] == pytest.approx(100 * 19 / 24)
    assert result["txt_r_mean"] == pytest.approx(50.0)
    assert result["img_r_mean"] == pytest.approx(100 * 39 / 72)
    assert result["r_mean"] == pytest.approx((50.0 + 100 * 39 / 72) / 2)
