"""Metrics, computed by the libraries people check against: scikit-learn (accuracy, macro-F1, the
per-class report) and seqeval (entity-level precision / recall / F1 of BIO tagging and the per-type
report, CoNLL style: an I- tag without a B- starts an entity, as in conlleval). Per-group accuracy.

Conventions (the libraries', made explicit): nothing to score gives NaN; a class that is neither in
the gold labels nor predicted has no F1 and is left out of macro-F1 and the report; a class predicted
only counts with F1 0; no entity found where there are some gives precision, recall and F1 0."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def accuracy(pred, gold) -> float:
    from sklearn.metrics import accuracy_score

    pred, gold = np.asarray(pred), np.asarray(gold)
    return float(accuracy_score(gold, pred)) if len(gold) else float("nan")


def macro_f1(pred, gold) -> float:
    """Mean F1 over the classes in `gold` or `pred` (sklearn f1_score, average='macro')."""
    from sklearn.metrics import f1_score

    pred, gold = np.asarray(pred), np.asarray(gold)
    return float(f1_score(gold, pred, average="macro", zero_division=0)) if len(gold) else float("nan")


def class_report(pred, gold, names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{class name: precision, recall, f1, support} for the classes in `gold` or `pred`, in id order
    (sklearn classification_report); `names`: id -> name."""
    from sklearn.metrics import classification_report

    pred, gold = np.asarray(pred), np.asarray(gold)
    if not len(gold):
        return {}
    present = sorted(int(c) for c in set(np.unique(gold).tolist()) | set(np.unique(pred).tolist()))
    labels = [str(names[c]) if 0 <= c < len(names) else str(c) for c in present]
    rep = classification_report(gold, pred, labels=present, target_names=labels, output_dict=True, zero_division=0)
    return {n: _row(rep[n]) for n in labels}


def grouped_accuracy(pred, gold, groups, names: Sequence[str]) -> Dict[str, float]:
    pred, gold, groups = np.asarray(pred), np.asarray(gold), np.asarray(groups)
    return {n: accuracy(pred[groups == i], gold[groups == i]) for i, n in enumerate(names) if np.any(groups == i)}


def _lists(seqs: List[Sequence[str]]) -> List[List[str]]:
    return [[str(t) for t in s] for s in seqs]


def entity_f1(pred_seqs: List[Sequence[str]], gold_seqs: List[Sequence[str]]) -> Dict[str, float]:
    """Entity-level precision / recall / F1 (micro, exact span and type) over BIO-tagged sequences (seqeval)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    p, g = _lists(pred_seqs), _lists(gold_seqs)
    return {"precision": float(precision_score(g, p, zero_division=0)),
            "recall": float(recall_score(g, p, zero_division=0)),
            "f1": float(f1_score(g, p, zero_division=0))}


def entity_report(pred_seqs: List[Sequence[str]], gold_seqs: List[Sequence[str]]) -> Dict[str, Dict[str, float]]:
    """{entity type: precision, recall, f1, support} for the types in the gold or predicted tags,
    sorted (seqeval classification_report); {} when there is no entity at all."""
    from seqeval.metrics import classification_report
    from seqeval.metrics.sequence_labeling import get_entities

    p, g = _lists(pred_seqs), _lists(gold_seqs)
    if not get_entities(p) and not get_entities(g):
        return {}
    rep = classification_report(g, p, output_dict=True, zero_division=0)
    return {t: _row(r) for t, r in rep.items() if not t.endswith(" avg")}


def _row(r: dict) -> Dict[str, float]:
    return {"precision": float(r["precision"]), "recall": float(r["recall"]), "f1": float(r["f1-score"]),
            "support": int(r["support"])}
