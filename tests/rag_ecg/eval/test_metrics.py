"""Metric functions against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from rag_ecg.eval.metrics import (binarize, choose_thresholds, hamming_loss, knn_classification, knn_scores,
                                  labels_to_matrix, macro_auc, macro_f1, per_class_f1, recall_at_k, roc_auc,
                                  vote_scores)


def test_roc_auc_hand_computed():
    # pairs (pos, neg): pos {0.8, 0.4}, neg {0.6, 0.2}: 0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2 -> 3/4
    assert roc_auc([1, 0, 1, 0], [0.8, 0.6, 0.4, 0.2]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: pos {0.5, 0.9}, neg {0.5, 0.1}
    # 0.5=0.5 (0.5), 0.5>0.1, 0.9>0.5, 0.9>0.1 -> 3.5/4
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.875)
    # all scores tied -> chance; perfect and reversed rankings
    assert roc_auc([1, 0, 0, 1, 0], [0.3] * 5) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_roc_auc_matches_pairwise_definition_on_random_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 7, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert roc_auc(y, s) == pytest.approx(brute, abs=1e-12)


def test_macro_auc_skips_single_valued_classes():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    s = np.array([[0.9, 0.1, 0.2], [0.1, 0.3, 0.4], [0.8, 0.2, 0.6], [0.7, 0.4, 0.8]])
    # class 0: pos {0.9, 0.8} vs neg {0.1, 0.7}: all 4 pairs won -> 1.0; classes 1 and 2 are single-valued
    assert macro_auc(y, s) == pytest.approx(1.0)


def test_f1_hamming_and_binarised_auc_hand_computed():
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    p = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    # class 0: tp 1, fp 1, fn 1 -> 2/(2+1+1) = 0.5; class 1: tp 1, fp 0, fn 1 -> 2/3
    assert per_class_f1(y, p) == pytest.approx([0.5, 2 / 3])
    assert macro_f1(y, p) == pytest.approx((0.5 + 2 / 3) / 2)
    # a class no chart carries is not scored (a set labelled for some classes only), however often it is stated
    y3, p3 = np.c_[y, np.zeros(4, int)], np.c_[p, np.ones(4, int)]
    assert macro_f1(y3, p3) == pytest.approx((0.5 + 2 / 3) / 2) and per_class_f1(y3, p3)[2] == 0.0
    # wrong cells: (1,0), (2,0), (3,1) -> 3 of 8
    assert hamming_loss(y, p) == pytest.approx(3 / 8)
    # AUC of 0/1 predictions = (TPR + TNR) / 2: class 0 -> (1/2 + 1/2)/2, class 1 -> (1/2 + 1)/2
    assert macro_auc(y, p) == pytest.approx((0.5 + 0.75) / 2)
    # a class never present nor predicted scores F1 0 (as sklearn's default)
    assert per_class_f1([[0], [0]], [[0], [0]]) == pytest.approx([0.0])


def test_choose_thresholds_maximises_f1_on_training_scores():
    y = np.array([1, 1, 0, 1, 0, 0])[:, None]
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.1])[:, None]
    # cut between 0.6 and 0.3 predicts 4 positives: tp 3 fp 1 -> F1 6/7; cut between 0.8 and 0.7: tp 2 -> 0.8
    t = choose_thresholds(y, s)
    assert t[0] == pytest.approx(0.45)
    assert binarize(s, t)[:, 0].tolist() == [1, 1, 1, 1, 0, 0]
    # a class with no positives: the best F1 is 0 everywhere, ties go to the highest cut (predict none)
    t0 = choose_thresholds(np.zeros((3, 1)), np.array([[0.2], [0.5], [0.9]]))
    assert binarize(np.array([[0.2], [0.5], [0.9]]), t0).sum() == 0


def test_recall_at_k_hand_computed_with_ties_against_the_query():
    sim = np.array([[0.9, 0.5, 0.1],
                    [0.2, 0.3, 0.8],
                    [0.4, 0.4, 0.4]])
    rel = np.eye(3, dtype=bool)
    r = recall_at_k(sim, rel, (1, 2, 3))
    # q0: rank 1; q1: its target (0.3) has 0.8 above -> rank 2; q2: three-way tie -> rank 3
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": pytest.approx(1.0)}
    # several relevant targets: the best one counts. q0's best relevant (0.5) ranks 2nd; q1's only
    # relevant (0.2) ranks 3rd; q2 ties three ways -> rank 3
    rel2 = np.array([[False, True, True], [True, False, False], [False, False, True]])
    assert recall_at_k(sim, rel2, (1, 2, 3)) == {"R@1": 0.0, "R@2": pytest.approx(1 / 3), "R@3": 1.0}


def test_vote_scores_softmax_weights_hand_computed():
    sims = np.array([[0.9, 0.8, -np.inf]])
    labels = np.array([[[1, 0], [0, 1], [1, 1]]])
    w1, w2 = 1.0, math.exp((0.8 - 0.9) / 0.1)
    got = vote_scores(sims, labels, temperature=0.1)
    assert got[0] == pytest.approx([w1 / (w1 + w2), w2 / (w1 + w2)])
    # no admissible neighbour -> zero votes; huge temperature -> plain majority
    assert vote_scores(np.array([[-np.inf]]), np.array([[[1]]]), 0.1)[0, 0] == 0.0
    assert vote_scores(np.array([[0.9, 0.1, 0.5]]), np.array([[[1], [0], [1]]]), 1e9)[0, 0] == pytest.approx(2 / 3)


def test_knn_scores_excludes_own_group_and_picks_top_k():
    ref = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    y = np.array([[1], [1], [0], [0]])
    q = np.array([[1, 0]], dtype=np.float32)
    # top-2 by cosine: ref0 (1.0), ref1 (0.8) -> both positive
    assert knn_scores(q, ref, y, k=2)[0, 0] == pytest.approx(1.0)
    # ref0 belongs to the query's patient: top-2 are ref1 (0.8) and ref2 (0.0)
    s = knn_scores(q, ref, y, k=2, temperature=0.1, query_groups=["p1"], ref_groups=["p1", "p2", "p3", "p4"])
    w1, w2 = 1.0, math.exp((0.0 - 0.8) / 0.1)
    assert s[0, 0] == pytest.approx(w1 / (w1 + w2))
    with pytest.raises(ValueError, match="both query_groups and ref_groups"):
        knn_scores(q, ref, y, query_groups=["a"])


def test_knn_classification_on_separable_clusters_is_perfect():
    rng = np.random.default_rng(1)
    centers = np.eye(4, dtype=np.float32)[:2]
    y_ref = np.repeat(np.array([[1, 0], [0, 1]]), 20, axis=0)
    ref = np.repeat(centers, 20, axis=0) + 0.05 * rng.standard_normal((40, 4)).astype(np.float32)
    q = np.repeat(centers, 5, axis=0) + 0.05 * rng.standard_normal((10, 4)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    y_q = np.repeat(np.array([[1, 0], [0, 1]]), 5, axis=0)
    m = knn_classification(q, y_q, ref, y_ref, k=5, classes=("A", "B"))
    assert m["auc"] == 1.0 and m["f1"] == 1.0 and m["hamming"] == 0.0 and m["auc_binarized"] == 1.0
    assert m["loo_library_auc"] == 1.0
    assert set(m["per_class"]) == {"A", "B"}


def test_labels_matrix():
    assert labels_to_matrix([["MI", "NORM"], [], ["XYZ"]]).tolist() == [[1, 1, 0, 0, 0], [0] * 5, [0] * 5]


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="roc_auc: 3 labels but 2 scores"):
        roc_auc([1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="must be equal"):
        recall_at_k(np.zeros((2, 3)), np.zeros((3, 2), bool))
