"""The project's metrics (mmkernels/train/metrics.py) against the libraries people check against:
seqeval (entity level, CoNLL style: an I- tag without a B- starts an entity) and scikit-learn (accuracy,
macro-F1, classification report), on hand-made cases, the edge cases and random BIO sequences checked
against a by-definition count of the entities too; the report's per-class and per-entity tables."""
import math

import numpy as np
import pytest
import seqeval.metrics as sq
import sklearn.metrics as skm

from mmkernels.train import metrics as M


def spans(tags):
    """By definition (conlleval): an entity starts at B-X, at I-X after O or after another type, and
    runs over the following I-X."""
    out, start, typ = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        if t == "O" or t.startswith("B-") or t[2:] != typ:
            if typ is not None:
                out.add((typ, start, i))
            start, typ = (i, t[2:]) if t != "O" else (None, None)
    return out


def by_definition(pred_seqs, gold_seqs):
    tp = fp = fn = 0
    for p, g in zip(pred_seqs, gold_seqs):
        pe, ge = spans(p), spans(g)
        tp, fp, fn = tp + len(pe & ge), fp + len(pe - ge), fn + len(ge - pe)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}


def seqeval_scores(pred_seqs, gold_seqs):
    return {"precision": sq.precision_score(gold_seqs, pred_seqs, zero_division=0),
            "recall": sq.recall_score(gold_seqs, pred_seqs, zero_division=0),
            "f1": sq.f1_score(gold_seqs, pred_seqs, zero_division=0)}


ENTITY_CASES = {
    "one wrong type": ([["B-PER", "I-PER", "O", "B-PER"], ["O", "B-ORG"]],
                       [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]], (2 / 3, 2 / 3)),
    "no predicted entities": ([["O", "O", "O"], ["O"]], [["B-X", "I-X", "O"], ["B-Y"]], (0.0, 0.0)),
    "no entities at all": ([["O", "O"]], [["O", "O"]], (0.0, 0.0)),
    "I- without B- starts an entity": ([["I-X", "I-X", "O", "O", "I-Y"]], [["B-X", "I-X", "O", "O", "B-Y"]],
                                       (1.0, 1.0)),
    "I- of another type ends the entity": ([["B-X", "I-Y"]], [["B-X", "B-Y"]], (1.0, 1.0)),
    "a span cut short": ([["B-X", "O", "B-Y"]], [["B-X", "I-X", "B-Y"]], (0.5, 0.5)),
}


@pytest.mark.parametrize("name", list(ENTITY_CASES))
def test_entity_scores_agree_with_seqeval_and_by_definition(name):
    pred, gold, (prec, rec) = ENTITY_CASES[name]
    got = M.entity_f1(pred, gold)
    assert got["precision"] == pytest.approx(prec) and got["recall"] == pytest.approx(rec)
    for ref in (seqeval_scores(pred, gold), by_definition(pred, gold)):
        assert got == pytest.approx(ref), (got, ref)


def test_entity_scores_on_random_bio_sequences():
    rng = np.random.default_rng(0)
    tags = ["O", "B-A", "I-A", "B-B", "I-B", "B-CITY", "I-CITY"]
    for _ in range(200):
        n = int(rng.integers(1, 6))
        lens = rng.integers(0, 9, n)
        gold = [[tags[i] for i in rng.integers(0, len(tags), k)] for k in lens]
        pred = [[t if rng.random() < 0.7 else tags[int(rng.integers(len(tags)))] for t in g] for g in gold]
        got = M.entity_f1(pred, gold)
        assert got == pytest.approx(seqeval_scores(pred, gold)) and got == pytest.approx(by_definition(pred, gold))


def test_entity_report_is_seqevals_per_type_report():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["I-ORG", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O", "B-MISC"]]
    rep = M.entity_report(pred, gold)
    ref = sq.classification_report(gold, pred, output_dict=True, zero_division=0)
    assert set(rep) == {"LOC", "MISC", "ORG", "PER"}  # MISC: predicted only, support 0
    for t, r in rep.items():
        assert r == pytest.approx({"precision": ref[t]["precision"], "recall": ref[t]["recall"],
                                   "f1": ref[t]["f1-score"], "support": ref[t]["support"]}), t
    assert rep["LOC"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert rep["ORG"]["f1"] == 1.0  # I-ORG without B-ORG is the entity ORG
    assert rep["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert M.entity_report([["O"]], [["O"]]) == {}  # no entity anywhere: no rows, no error


CLASS_CASES = {
    "plain": ([0, 1, 1, 2, 0, 2], [0, 1, 2, 2, 1, 2]),
    "a class never predicted": ([0, 0, 0, 0], [0, 1, 0, 1]),
    "a class only predicted": ([0, 3, 1, 1], [0, 0, 1, 1]),
    "all right": ([2, 2, 0], [2, 2, 0]),
}


@pytest.mark.parametrize("name", list(CLASS_CASES))
def test_classification_metrics_agree_with_sklearn(name):
    pred, gold = (np.array(x) for x in CLASS_CASES[name])
    assert M.accuracy(pred, gold) == pytest.approx(skm.accuracy_score(gold, pred))
    assert M.macro_f1(pred, gold) == pytest.approx(skm.f1_score(gold, pred, average="macro", zero_division=0))
    names = ["zero", "one", "two", "three", "four"]
    rep = M.class_report(pred, gold, names)
    present = sorted(set(gold.tolist()) | set(pred.tolist()))
    ref = skm.classification_report(gold, pred, labels=present, target_names=[names[i] for i in present],
                                    output_dict=True, zero_division=0)
    assert list(rep) == [names[i] for i in present]
    for n, r in rep.items():
        assert r == pytest.approx({"precision": ref[n]["precision"], "recall": ref[n]["recall"],
                                   "f1": ref[n]["f1-score"], "support": ref[n]["support"]}), n


def test_classification_edge_cases_by_hand():
    # classes 2..4 of the model's five never occur (empty classes): left out of macro-F1, not counted as 0
    assert M.macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 0.8) / 2)
    assert "two" not in M.class_report([0, 0, 1, 1], [0, 1, 1, 1], ["zero", "one", "two", "three", "four"])
    # a class only predicted counts, with F1 0
    assert M.macro_f1([0, 3], [0, 0]) == pytest.approx((2 / 3 + 0.0) / 2)
    # nothing to score
    assert math.isnan(M.accuracy([], [])) and math.isnan(M.macro_f1([], []))
    assert M.class_report([], [], ["a"]) == {}


def test_format_report_keeps_its_table_and_adds_the_test_split_per_class():
    from mmkernels.train.evaluation import format_report
    row = {"accuracy": 0.5, "macro_f1": 0.25, "per_type": {"sum": 0.5}}
    rep = {"test": {**row, "per_class": {"yes": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4}}},
           "test_without_image": row}
    lines = format_report(rep).splitlines()
    assert lines[0].split() == ["split", "acc", "mF1", "sum"]
    assert lines[2].split() == ["test", "50.00", "25.00", "50.00"]
    assert lines[3].split() == ["test_without_image", "50.00", "25.00", "50.00"]
    i = lines.index("test, per class")
    assert lines[i + 1].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[i + 2].split() == ["yes", "100.00", "50.00", "66.67", "4"]
    ent = {"test": {"accuracy": 1.0, "macro_f1": 1.0, "entity_f1": 1.0, "per_type": {},
                    "per_entity": {"LOC": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}}}}
    lines = format_report(ent).splitlines()
    assert lines[0].split() == ["split", "acc", "mF1", "entF1"]
    i = lines.index("test, per entity type")
    assert lines[i + 2].split() == ["LOC", "100.00", "100.00", "100.00", "2"]
