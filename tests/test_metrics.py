"""Scoring in common.py against hand-computed answers (and scipy where it is installed).

Every expected number below was worked out by hand; the derivation sits next to it.
"""

import math

import numpy as np
import pytest

import common


# ---- GLUE


def test_mcc_hand_computed():
    # tp = 2 (items 0, 4), fp = 1 (item 1), tn = 1 (item 2), fn = 1 (item 3)
    # MCC = (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 − 1) / sqrt(3·3·2·2) = 1/6
    out = common.glue_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert set(out) == {"matthews_correlation"}
    assert out["matthews_correlation"] == pytest.approx(1 / 6)


def test_mcc_perfect_inverse_and_constant():
    assert common.glue_metrics("cola", [0, 1, 1, 0], [0, 1, 1, 0])["matthews_correlation"] == pytest.approx(1.0)
    assert common.glue_metrics("cola", [1, 0, 0, 1], [0, 1, 1, 0])["matthews_correlation"] == pytest.approx(-1.0)
    # A constant prediction makes the denominator 0: MCC is 0, never NaN.
    for constant in ([1, 1, 1, 1], [0, 0, 0, 0]):
        value = common.glue_metrics("cola", constant, [0, 1, 0, 1])["matthews_correlation"]
        assert value == 0.0 and not math.isnan(value)


def test_mcc_multiclass_matches_binary_formula_on_two_classes_and_hand_value():
    # Three classes, confusion (rows = gold, cols = predicted): [[2,0,0],[0,1,1],[0,1,1]]
    # n = 6, c = 4, t = (2,2,2), p = (2,2,2): (c·n − t·p) / sqrt((n² − p·p)(n² − t·t)) = (24 − 12) / (36 − 12) = 0.5
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 0, 1, 2, 1, 2]
    assert common.matthews_correlation(pred, gold) == pytest.approx(0.5)


def test_accuracy_and_f1_for_mrpc_and_qqp():
    # tp = 2, fp = 1, fn = 1 -> F1 = 2·2 / (2·2 + 1 + 1) = 2/3; 3 of 5 right -> accuracy 0.6
    for task in ("mrpc", "qqp"):
        out = common.glue_metrics(task, [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
        assert set(out) == {"accuracy", "f1"}
        assert out["accuracy"] == pytest.approx(0.6)
        assert out["f1"] == pytest.approx(2 / 3)
    # No positive anywhere: F1 is 0 (sklearn's zero_division behaviour), not NaN.
    assert common.glue_metrics("mrpc", [0, 0], [0, 0])["f1"] == 0.0


def test_accuracy_tasks_and_logits():
    for task in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert common.glue_metrics(task, [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": pytest.approx(0.75)}
    # (N, C) logits are reduced by argmax: rows predict 2, 0, 1
    logits = np.array([[0.0, 0.1, 0.9], [2.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    assert common.glue_metrics("mnli", logits, [2, 0, 2])["accuracy"] == pytest.approx(2 / 3)


def test_pearson_and_spearman_with_ties():
    # x = [1, 2, 2, 3], y = [1, 2, 3, 3]
    # Pearson: dx = [-1, 0, 0, 1], dy = [-1.25, -0.25, 0.75, 0.75]; dx·dy = 2, |dx|² = 2, |dy|² = 2.75
    #          -> 2 / sqrt(5.5)
    # Spearman: average ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3.5, 3.5]; centred: [-1.5, 0, 0, 1.5] and
    #          [-1.5, -0.5, 1, 1]; dot = 3.75, norms² = 4.5 and 4.5 -> 3.75 / 4.5 = 5/6
    out = common.glue_metrics("stsb", [1, 2, 2, 3], [1, 2, 3, 3])
    assert set(out) == {"pearson", "spearmanr"}
    assert out["pearson"] == pytest.approx(2 / math.sqrt(5.5))
    assert out["spearmanr"] == pytest.approx(5 / 6)
    np.testing.assert_allclose(common.average_ranks([3.0, 1.0, 3.0, 3.0, 0.5]), [4, 2, 4, 4, 1])
    # (N, 1) regression outputs are accepted
    assert common.glue_metrics("stsb", np.array([[1.0], [2.0], [2.0], [3.0]]), [1, 2, 3, 3]) == out


def test_correlations_match_scipy_on_random_data_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=200).astype(float)  # many ties
    y = x + rng.normal(size=200)
    y[:50] = np.round(y[:50])
    assert common.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert common.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)
    np.testing.assert_allclose(common.average_ranks(y), stats.rankdata(y))


def test_glue_unknown_task_is_user_error():
    with pytest.raises(common.UserError, match="unknown GLUE task 'foo'.*cola"):
        common.glue_metrics("foo", [0], [0])


# ---- SQuAD v1.1


def test_squad_normalisation():
    assert common.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert common.normalize_answer("An apple, a pear; the end.") == "apple pear end"
    # Articles only as whole words: "theatre" and "another" keep their letters.
    assert common.normalize_answer("Another theatre") == "another theatre"
    # Punctuation is removed before articles, so "the-end" -> "theend" (the official order).
    assert common.normalize_answer("the-end") == "theend"


def test_squad_em_f1_hand_computed():
    references = {
        "q1": ["Paris"],  # prediction "Paris, France." -> "paris france" vs "paris": EM 0, F1 2·(1/2·1)/(1/2+1) = 2/3
        "q2": ["the Eiffel Tower", "Tower"],  # "eiffel tower" equals gold 1 after normalisation: EM 1, F1 1
        "q3": ["in 1889", "1889"],  # "1887": no shared token: EM 0, F1 0
        "q4": ["a red car", "the blue bus"],  # "blue car": F1 vs "red car" = 1/2, vs "blue bus" = 1/2 -> 0.5
    }
    predictions = {"q1": "Paris, France.", "q2": "Eiffel tower", "q3": "1887", "q4": "blue car"}
    out = common.squad_metrics(predictions, references)
    assert set(out) == {"exact_match", "f1"}
    assert out["exact_match"] == pytest.approx(100 * 1 / 4)
    assert out["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0 + 0.5) / 4)


def test_squad_max_over_golds_and_missing_prediction():
    # Gold 2 matches exactly, gold 1 does not: the best one counts.
    out = common.squad_metrics({"q": "1889"}, {"q": ["in the year 1889", "1889"]})
    assert out == {"exact_match": pytest.approx(100.0), "f1": pytest.approx(100.0)}
    # A question without a prediction scores 0 and still counts in the average.
    out = common.squad_metrics({"a": "x"}, {"a": ["x"], "b": ["y"]})
    assert out["exact_match"] == pytest.approx(50.0) and out["f1"] == pytest.approx(50.0)


# ---- CoNLL-2003 (entity level, seqeval's default mode; conlleval.pl agrees on IOB1/IOB2)


def test_conll_iob1_runs():
    # IOB1: a run of I- tags is one entity; the type change starts another.
    assert common.entity_spans("I-PER I-PER I-LOC".split()) == {("PER", 0, 1), ("LOC", 2, 2)}
    # IOB1: B- separates two adjacent entities of the same type.
    assert common.entity_spans("I-PER B-PER O".split()) == {("PER", 0, 0), ("PER", 1, 1)}
    # An entity ending the sentence is closed.
    assert common.entity_spans("O I-ORG I-ORG".split()) == {("ORG", 1, 2)}


def test_conll_iob2_and_ill_formed_sequences():
    assert common.entity_spans("B-PER I-PER O B-LOC".split()) == {("PER", 0, 1), ("LOC", 3, 3)}
    # I- after O, and I- of another type, start a new entity (conlleval / seqeval default mode).
    assert common.entity_spans("O I-MISC B-PER I-LOC".split()) == {("MISC", 1, 1), ("PER", 2, 2), ("LOC", 3, 3)}
    # IOBES is read too (seqeval's default mode; conlleval.pl has no S- rule).
    assert common.entity_spans("B-PER E-PER S-LOC".split()) == {("PER", 0, 1), ("LOC", 2, 2)}


def test_conll_iob1_and_iob2_encodings_score_the_same():
    iob1 = [["I-PER", "I-PER", "I-LOC", "O", "I-ORG", "B-ORG"]]
    iob2 = [["B-PER", "I-PER", "B-LOC", "O", "B-ORG", "B-ORG"]]
    assert common.conll_metrics(iob1, iob2)["f1"] == pytest.approx(1.0)


def test_conll_metrics_seqeval_readme_example():
    # seqeval's README example: 2 gold entities, 2 predicted, 1 right -> P = R = F1 = 0.5;
    # 8 of 10 tokens right -> accuracy 0.8
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    out = common.conll_metrics(pred, gold)
    assert out == {"precision": pytest.approx(0.5), "recall": pytest.approx(0.5), "f1": pytest.approx(0.5),
                   "accuracy": pytest.approx(0.8)}


def test_conll_metrics_hand_computed_iob1():
    # gold: PER(0-1), LOC(2)            pred: PER(0), LOC(1-2), ORG(4)
    # tp = 0 -> P = R = F1 = 0; tokens right: 0, 2, 3 -> 3/5
    gold = [["I-PER", "I-PER", "I-LOC", "O", "O"]]
    pred = [["I-PER", "I-LOC", "I-LOC", "O", "I-ORG"]]
    out = common.conll_metrics(pred, gold)
    assert out["precision"] == 0 and out["recall"] == 0 and out["f1"] == 0
    assert out["accuracy"] == pytest.approx(3 / 5)
    # gold: PER(0-1), LOC(2), ORG(4)    pred: PER(0-1), ORG(4)   -> P = 2/2, R = 2/3, F1 = 0.8
    gold = [["I-PER", "I-PER", "I-LOC", "O", "I-ORG"]]
    pred = [["I-PER", "I-PER", "O", "O", "I-ORG"]]
    out = common.conll_metrics(pred, gold)
    assert (out["precision"], out["recall"], out["f1"]) == (pytest.approx(1.0), pytest.approx(2 / 3),
                                                           pytest.approx(0.8))
    # Entities never cross sentences: the two one-token PERs are two entities.
    out = common.conll_metrics([["I-PER"], ["I-PER"]], [["I-PER"], ["I-PER"]])
    assert out["f1"] == pytest.approx(1.0)
