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
        "Are the heard and the written digits the same?",
        "Do the audio and the image show one and the same digit?",
        "Is the spoken digit equal to the handwritten digit?",
        "Does the handwritten number agree with the number spoken aloud?",
        "Is what you hear the digit you see?",
        "Do the picture and the speech give matching digits?",
        "Are the two digits, spoken and written, identical?",
        "Does the speaker pronounce the digit shown in the photo?",
        # held out:
        "Does the voice say the same digit that is written?",
    ],
    "sum": [
        "What is the sum of the spoken and the written digits?",
        "Add the digit you hear to the digit in the image.",
        "What do the heard number and the written number add up to?",
        "How much is the spoken number plus the written number?",
        "Add up the spoken digit and the handwritten digit.",
        "What do you get when you add the two digits together?",
        "What is the spoken digit plus the digit in the picture?",
        "Compute the sum of the number heard and the number seen.",
        "If you add the image's digit to the audio's digit, what is the result?",
        "What number results from adding the digit you see and the digit you hear?",
        "How much do the digit in the speech and the digit in the photo come to together?",
        "Give the result of adding the heard digit and the written digit.",
        "What is the handwritten number added to the number the speaker pronounces?",
        # held out:
        "What is the total of the number in the audio plus the number in the picture?",
    ],
    "heard": [
        "Which digit is spoken?",
        "What number do you hear?",
        "What digit does the voice say in the audio?",
        "Tell me the number that is spoken in the audio.",
        "What is the spoken digit?",
        "Which digit can be heard in the audio clip?",
        "Name the digit pronounced by the speaker.",
        "What number does the speaker pronounce?",
        "Listen to the audio: which digit is it?",
        "What digit is in the sound?",
        "Identify the number in the speech.",
        "Which number is spoken aloud?",
        "What is the digit in the audio?",
        # held out:
        "Which number is said in the recording?",
    ],
    "written": [
        "Which digit is written?",
        "What number is shown in the image?",
        "What digit do you see in the picture?",
        "Tell me the number that is written in the picture.",
        "What is the written digit?",
        "Which digit appears in the image?",
        "Read the handwritten digit: what is it?",
        "What number is written down in the picture?",
        "Look at the image: which digit is it?",
        "What digit is in the photo?",
        "Identify the handwritten number.",
        "Which number can you see?",
        "What is the digit in the image?",
        # held out:
        "Which number is drawn in the image?",
    ],
    "larger": [
        "Is the spoken digit larger than the written digit?",
        "Is the number you hear bigger than the number in the image?",
        "Is the digit in the audio greater than the digit in the picture?",
        "Does the spoken number exceed the written number?",
        "Is the heard digit greater than the one in the image?",
        "Is the spoken number more than the handwritten number?",
        "Does the digit in the speech exceed the digit in the photo?",
        "Of the two digits, is the spoken one the larger?",
        "Is the written digit smaller than the spoken digit?",
        "Is the digit you hear above the digit you see?",
        "Is the audio's digit bigger than the image's digit?",
        "Is the spoken value greater than the written value?",
        "Is the digit in the image less than the digit in the audio?",
        # held out:
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
