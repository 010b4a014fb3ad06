"""The questions of the AV-MNIST data set: answers, question types and the phrasings of each type.
The LAST phrasing of each type is held out of training (it only appears in the `test_heldout` split)."""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List

ANSWERS = [str(i) for i in range(19)] + ["yes", "no"]
ANSWER_TO_ID = {a: i for i, a in enumerate(ANSWERS)}
QUESTION_TYPES = ["match", "sum", "heard", "written", "larger"]
MODALITIES = ("text", "image", "audio")

# Phrasings per question type; the LAST one of each type is held out of training
# (it only appears in the `test_heldout` split).
TEMPLATES: Dict[str, List[str]] = {
    "match": [
        "Do the spoken digit and the written digit match?",
        "Is the number you hear the same as the number in the image?",
        "Are the digit in the picture and the digit in the audio equal?",
        "Does the spoken number equal the written number?",
        "Is the heard digit identical to the one shown?",
        "Does the voice say the same digit that is written?",
    ],
    "sum": [
        "What is the sum of the spoken and the written digits?",
        "Add the digit you hear to the digit in the image.",
        "What do the heard number and the written number add up to?",
        "How much is the spoken number plus the written number?",
        "What is the total of the number in the audio plus the number in the picture?",
    ],
    "heard": [
        "Which digit is spoken?",
        "What number do you hear?",
        "What digit does the voice say in the audio?",
        "Tell me the number that is spoken in the audio.",
        "Which number is said in the recording?",
    ],
    "written": [
        "Which digit is written?",
        "What number is shown in the image?",
        "What digit do you see in the picture?",
        "Tell me the number that is written in the picture.",
        "Which number is drawn in the image?",
    ],
    "larger": [
        "Is the spoken digit larger than the written digit?",
        "Is the number you hear bigger than the number in the image?",
        "Is the digit in the audio greater than the digit in the picture?",
        "Does the spoken number exceed the written number?",
        "Does the voice say a higher number than the written one?",
    ],
}


def all_templates():
    """[(template_id, qtype_id, text, heldout)] in a fixed order."""
    out = []
    for qi, qt in enumerate(QUESTION_TYPES):
        ph = TEMPLATES[qt]
        for j, text in enumerate(ph):
            out.append((len(out), qi, text, j == len(ph) - 1))
    return out


def templates_digest() -> str:
    """Changes whenever a phrasing does: part of the built data's cache key."""
    return hashlib.sha1(json.dumps(TEMPLATES, sort_keys=True).encode()).hexdigest()[:12]
