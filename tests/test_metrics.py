from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from recmtl.metrics import auc, gauc, logloss


def test_gauc_matches_per_group_sklearn():
    rng = np.random.default_rng(0)
    n = 3000
    group = rng.integers(0, 40, n)
    label = (rng.random(n) < 0.3).astype(float)
    score = np.round(label * 0.3 + rng.random(n), 2)  # ties inside groups
    num = den = 0.0
    for g in np.unique(group):
        m = group == g
        if 0 < label[m].sum() < m.sum():
            num += roc_auc_score(label[m], score[m]) * m.sum()
            den += m.sum()
    assert gauc(label, score, group) == pytest.approx(num / den, abs=1e-12)


def test_single_class_and_empty():
    assert math.isnan(auc(np.ones(5), np.random.rand(5)))
    assert math.isnan(logloss(np.array([]), np.array([])))
    assert math.isnan(gauc(np.ones(4), np.random.rand(4), np.array([1, 1, 2, 2])))
