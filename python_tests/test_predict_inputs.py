"""Bad inputs of mmkernels-predict and of JSON lines data: WAVs of other sample rates, channels and sample
formats are read as the model's 8 kHz mono and give the same answers; an unreadable or missing image or
audio file, a missing or mistyped field, a line that is not a JSON object: one `error:` line naming the
queries file and its line (and the file), exit code 2, no output file."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import jsonl_overrides, write_digit_jsonl  # noqa: E402
from utils import write_wav  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def speech_clip():
    """'seven' spoken by eSpeak NG at its own rate (22.05 kHz), before any resampling."""
    from mmkernels.data.speech import EspeakSynth, Speaker
    s = EspeakSynth()
    s.synth("seven", Speaker("en", "m3", 150, 50, 50))  # sets the voice
    x = np.concatenate(s._chunks).astype(np.float32) / 32768.0
    return x / np.abs(x).max() * 0.8, s.sample_rate


@pytest.fixture(scope="module")
def wavs(speech_clip, tmp_path_factory):
    """The same speech as WAVs of several rates, channel counts and sample formats."""
    import scipy.io.wavfile
    from mmkernels.data.speech import resample
    x, sr = speech_clip
    d = tmp_path_factory.mktemp("wavs")
    out = {}
    for name, rate, kw in (("8k", 8000, {}), ("16k", 16000, {}), ("44k_stereo", 44100, {"channels": 2}),
                           ("22k_8bit", sr, {"width": 1}), ("16k_32bit", 16000, {"width": 4})):
        out[name] = str(d / f"{name}.wav")
        write_wav(out[name], resample(x, sr, rate), rate, **kw)
    out["16k_float"] = str(d / "16k_float.wav")  # IEEE float samples (format 3): not for Python's wave module
    scipy.io.wavfile.write(out["16k_float"], 16000, resample(x, sr, 16000).astype(np.float32))
    out["24k_float64"] = str(d / "24k_float64.wav")
    scipy.io.wavfile.write(out["24k_float64"], 24000, resample(x, sr, 24000).astype(np.float64))
    return out


def test_wavs_of_any_rate_and_format_read_as_the_8khz_one(wavs):
    from mmkernels.data.speech import SAMPLE_RATE, load_audio
    ref = load_audio(wavs["8k"])
    assert ref.dtype == np.float32 and 0.3 * SAMPLE_RATE < len(ref) < 2 * SAMPLE_RATE
    for name, path in wavs.items():
        x = load_audio(path)
        assert x.dtype == np.float32 and abs(len(x) - len(ref)) <= 8, (name, len(x), len(ref))
        # the same waveform, give or take where the silence trimming cut it (a few samples)
        corr = max(similarity(x[max(0, lag):], ref[max(0, -lag):]) for lag in range(-8, 9))
        assert corr > 0.98, (name, corr)


def similarity(a, b) -> float:
    n = min(len(a), len(b))
    return float(np.dot(a[:n], b[:n]) / np.linalg.norm(a[:n]) / np.linalg.norm(b[:n]))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model trained on the digit JSON lines (image + question + audio)."""
    from mmkernels.train.cli import train_main
    d = str(tmp_path_factory.mktemp("digits"))
    files = write_digit_jsonl(d, n_train=32, n_val=16, n_test=16)
    out = os.path.join(d, "run")
    assert train_main(jsonl_overrides(files, out, epochs=1)) == 0
    return os.path.join(out, "best"), files


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_predict_answers_alike_for_every_rate_and_format(model, wavs, tmp_path):
    from mmkernels.train.cli import predict_main
    best, files = model
    image = json.loads(open(files["test"]).readline())["image"]
    image = os.path.join(os.path.dirname(files["test"]), image)
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"image": image, "audio": p, "text": "which digit is written?"}) + "\n"
                         for p in wavs.values()))
    assert predict_main(["--model", best, "--input", str(q), "-o", str(tmp_path / "p.jsonl")]) == 0
    out = {os.path.basename(r["audio"])[:-4]: r for r in map(json.loads, open(tmp_path / "p.jsonl"))}
    assert list(out) == list(wavs)
    for name, r in out.items():
        assert r["answer"] == out["8k"]["answer"], name
        assert abs(r["score"] - out["8k"]["score"]) < 0.01, (name, r["score"], out["8k"]["score"])


def bad_queries(tmp_path, files):
    """(queries line, what the error must say) for one bad query after a good one and a blank line."""
    base = os.path.dirname(files["test"])
    good = json.loads(open(files["test"]).readline())
    img, wav = os.path.join(base, good["image"]), os.path.join(base, good["audio"])
    good = {**good, "image": img, "audio": wav}
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF0000WAVEjunk")
    (tmp_path / "a_folder.png").mkdir()
    return good, [
        ({**good, "image": str(tmp_path / "corrupt.png")}, f"cannot read image file {tmp_path / 'corrupt.png'}"),
        ({**good, "image": str(tmp_path / "gone.png")}, f"image file not found: {tmp_path / 'gone.png'}"),
        ({**good, "image": str(tmp_path / "a_folder.png")}, f"cannot read image file {tmp_path / 'a_folder.png'}"),
        ({**good, "audio": str(tmp_path / "corrupt.wav")}, f"malformed WAV file {tmp_path / 'corrupt.wav'}"),
        ({**good, "audio": str(tmp_path / "gone.wav")}, f"audio file not found: {tmp_path / 'gone.wav'}"),
        ({"image": img, "text": "x"}, "missing field 'audio' (the model uses audio)"),
        ({"image": 3, "audio": wav, "text": "x"}, "field 'image' must be a file path (a string), got 3"),
        ([img, wav], "expected a JSON object, got a list"),
    ]


def test_unreadable_inputs_name_the_queries_line_and_the_file(model, tmp_path, capsys):
    from mmkernels.train.cli import predict_main
    best, files = model
    good, cases = bad_queries(tmp_path, files)
    q = tmp_path / "q.jsonl"
    for workers in (0, 1):
        for bad, message in cases:
            q.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
            out = tmp_path / "p.jsonl"
            assert predict_main(["--model", best, "--input", str(q), "-o", str(out), "--workers", str(workers),
                                 "--batch-size", "1"]) == 2, message
            err = one_error_line(capsys)
            assert err.startswith(f"error: {q}:3: ") and message in err, (err, message)
            assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_one_error_line_from_a_fresh_process(model, tmp_path):
    """The real stderr of the command: no warning of the libraries, no progress bar, no traceback."""
    best, files = model
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"image": "nope.png", "audio": "nope.wav", "text": "which digit is written?"}) + "\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mmkernels.train.predict", "--model", best, "--input", str(q)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {q}:1: image file not found: {tmp_path / 'nope.png'}\n", r.stderr
