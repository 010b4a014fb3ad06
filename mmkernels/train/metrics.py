"""Metrics: accuracy, macro-F1, per-group accuracy, entity-level F1 for BIO tagging."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def macro_f1(pred, gold, num_classes: int = None) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.unique(gold) if num_classes is None else np.arange(num_classes)
    f1s = []
    for c in classes:
        tp = np.sum((pred == c) & (gold == c)); fp = np.sum((pred == c) & (gold != c)); fn = np.sum((pred != c) & (gold == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


def grouped_accuracy(pred, gold, groups, names: Sequence[str]) -> Dict[str, float]:
    pred, gold, groups = np.asarray(pred), np.asarray(gold), np.asarray(groups)
    return {n: accuracy(pred[groups == i], gold[groups == i]) for i, n in enumerate(names) if np.any(groups == i)}


def bio_entities(tags: Sequence[str]):
    """Set of (type, start, end) spans from BIO tags (I- without B- starts a span, as in conlleval)."""
    out, start, typ = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        if t.startswith("B-") or t == "O" or (t.startswith("I-") and t[2:] != typ):
            if typ is not None:
                out.add((typ, start, i))
            start, typ = (i, t[2:]) if t != "O" else (None, None)
    return out


def entity_f1(pred_seqs: List[Sequence[str]], gold_seqs: List[Sequence[str]]) -> Dict[str, float]:
    """Entity-level precision / recall / F1 over BIO-tagged sequences (exact span and type match)."""
    tp = fp = fn = 0
    for p, g in zip(pred_seqs, gold_seqs):
        pe, ge = bio_entities(p), bio_entities(g)
        tp += len(pe & ge); fp += len(pe - ge); fn += len(ge - pe)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1}
