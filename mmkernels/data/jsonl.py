"""Your own data as JSON lines: (question or text, image file, WAV file) -> a label, or tagged words.

One object a line in data.train_file / val_file / test_file (paths relative to the file's folder):
  classification:        {"text": "what is shown?", "image": "a.png", "audio": "a.wav", "label": "seven"}
  token_classification:  {"tokens": ["the", "seven", ...], "tags": ["O", "B-NUM", ...], "image": ..., "audio": ...}
Every modality the model uses must be on every line (text: "text", or "tokens" when tagging).
Labels (or tags) are the train file's, sorted; val/test may not bring new ones. Words are tagged
on their first sub-word token; the rest are ignored by the loss and the metrics (-100).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from mmkernels.data.avmnist import DataFormatError
from mmkernels.data.images import load_image
from mmkernels.data.speech import SAMPLE_RATE, load_audio

TASKS = ("classification", "token_classification")


class JsonlFormatError(DataFormatError):
    """A data file that is not what the task needs: names the file, the line and the field."""


def read_jsonl(path: str, task: str, modalities: Sequence[str]) -> List[dict]:
    return [rec for _, rec in read_jsonl_lines(path, task, modalities)]


def read_jsonl_lines(path: str, task: str, modalities: Sequence[str]) -> List[Tuple[int, dict]]:
    """(line number, record) for each record of a data file, its fields checked."""
    if not path:
        raise JsonlFormatError("data.dataset=jsonl needs data.train_file, data.val_file and data.test_file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    need = [m for m in ("image", "audio") if m in modalities]
    if "text" in modalities:
        need.append("tokens" if task == "token_classification" else "text")
    need += ["tags"] if task == "token_classification" else ["label"]
    out = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonlFormatError(f"{path}:{ln}: not valid JSON: {e}") from e
            if not isinstance(rec, dict):
                raise JsonlFormatError(f"{path}:{ln}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in need if k not in rec]
            if missing:
                raise JsonlFormatError(f"{path}:{ln}: missing field(s) {missing} (task {task}, modalities "
                                       f"{list(modalities)})")
            if task == "token_classification":
                if len(rec["tokens"]) != len(rec["tags"]):
                    raise JsonlFormatError(f"{path}:{ln}: {len(rec['tokens'])} tokens but {len(rec['tags'])} tags")
                rec["tags"] = [str(t) for t in rec["tags"]]
                bad = [t for t in rec["tags"] if t != "O" and not t.startswith(("B-", "I-"))]
                if bad:  # entity-level F1 reads spans from BIO tags: any other tag would never count
                    raise JsonlFormatError(f"{path}:{ln}: tags must be BIO (O, B-TYPE, I-TYPE), got {bad[:3]}")
            else:
                rec["label"] = str(rec["label"])
            for k in ("image", "audio"):
                if k in need and not isinstance(rec[k], str):
                    raise JsonlFormatError(f"{path}:{ln}: field '{k}' must be a file path (a string), "
                                           f"got {json.dumps(rec[k])}")
            out.append((ln, rec))
    if not out:
        raise JsonlFormatError(f"{path}: no records")
    return out


def label_names(records: List[dict], task: str) -> List[str]:
    if task == "token_classification":
        tags = sorted({t for r in records for t in r["tags"]} - {"O"})
        return ["O"] + tags
    return sorted({r["label"] for r in records})


class JsonlDataset(torch.utils.data.Dataset):
    """One split, loaded and preprocessed once (fixed padding, like the AV-MNIST splits)."""

    def __init__(self, path: str, tokenizer, labels: List[str], task: str, modalities: Sequence[str],
                 max_text_len: int = 24, max_audio_seconds: float = 1.0, progress: bool = False):
        if task not in TASKS:
            raise JsonlFormatError(f"data.dataset=jsonl trains model.task {TASKS}, got {task!r}")
        numbered = read_jsonl_lines(path, task, modalities)
        records = [rec for _, rec in numbered]
        base = os.path.dirname(os.path.abspath(path))
        index = {name: i for i, name in enumerate(labels)}
        n = len(records)

        def resolve(p):
            return p if os.path.isabs(p) else os.path.join(base, p)

        if task == "token_classification":
            enc = tokenizer([r.get("tokens", []) for r in records], is_split_into_words=True, padding="max_length",
                            truncation=True, max_length=max_text_len, return_tensors="pt")
            y = torch.full((n, max_text_len), -100, dtype=torch.long)
            cut_words = cut_entities = 0
            for i, r in enumerate(records):
                for tag in r["tags"]:
                    self._label(index, tag, path)  # every tag known, truncated or not
                seen = set()
                for pos, w in enumerate(enc.word_ids(i)):
                    if w is None or w in seen:
                        continue
                    seen.add(w)
                    y[i, pos] = index[r["tags"][w]]
                cut_words += len(r["tags"]) - len(seen)
                cut_entities += sum(t.startswith("B-") for t in r["tags"][len(seen):])
            if cut_words:
                warnings.warn(f"{path}: {cut_words} words ({cut_entities} entities) lie past data.max_text_len="
                              f"{max_text_len} tokens: they are neither trained nor scored; raise data.max_text_len",
                              stacklevel=2)
            self.truncated_words, self.truncated_entities = cut_words, cut_entities
        else:
            enc = tokenizer([str(r.get("text", "")) for r in records], padding="max_length", truncation=True,
                            max_length=max_text_len, return_tensors="pt")
            y = torch.tensor([self._label(index, r["label"], path) for r in records], dtype=torch.long)
        self.input_ids, self.attention_mask, self.labels = enc["input_ids"], enc["attention_mask"], y
        self.images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        max_len = int(max_audio_seconds * SAMPLE_RATE)
        self.audio = torch.zeros(n, max_len)
        self.audio_lengths = torch.ones(n, dtype=torch.long)
        from tqdm.auto import tqdm

        for i, (ln, r) in enumerate(tqdm(numbered, desc=f"reading {os.path.basename(path)}", disable=not progress,
                                         leave=False)):
            try:
                if "image" in modalities:
                    self.images[i] = load_image(resolve(r["image"]))
                if "audio" in modalities:
                    wav = load_audio(resolve(r["audio"]), SAMPLE_RATE)[:max_len]
                    self.audio[i, : len(wav)] = torch.from_numpy(np.ascontiguousarray(wav))
                    self.audio_lengths[i] = max(1, len(wav))
            except (OSError, ValueError) as e:  # missing or unreadable file: named with the data file's line
                raise JsonlFormatError(f"{path}:{ln}: {e}") from e

    @staticmethod
    def _label(index: Dict[str, int], name: str, path: str) -> int:
        if name not in index:
            raise JsonlFormatError(f"{path}: label {name!r} is not in the train file's labels {sorted(index)}")
        return index[name]

    def __len__(self):
        return self.labels.shape[0]

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "image": self.images[idx], "audio": self.audio[idx], "audio_lengths": self.audio_lengths[idx],
                "labels": self.labels[idx], "qtype": torch.zeros(len(idx), dtype=torch.long)}

    def __getitem__(self, i):
        return {k: v[0] for k, v in self.__getitems__([i]).items()}
