"""Training CLI end to end on a tiny data set: exact resume after a real SIGKILL mid-epoch, clear errors,
evaluation report, prediction (JSON lines), metrics log."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("espeakng_loader")
pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import ROOT, run_cli, tiny_overrides  # noqa: E402


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(run_dir, "last", "model.safetensors"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from mmkernels.data.avmnist import build_avmnist
    from mmkernels.train.config import load_config
    from mmkernels.train.data import data_config_of
    c = str(tmp_path_factory.mktemp("cache"))
    cfg = load_config(None, tiny_overrides(c, "unused"))
    build_avmnist(data_config_of(cfg), cache_dir=c, progress=False)
    return c


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runA"))
    r = run_cli(tiny_overrides(cache, out, final_eval=True, plot=True, log_every=1))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_uninterrupted_run_outputs(full_run):
    out, r = full_run
    for f in ("checkpoint.pt", "metrics.csv", "metrics.jsonl", "report.json", "learning_curves.png",
              "best/config.json", "best/model.safetensors", "last/model.safetensors", "run_config.json"):
        assert os.path.exists(os.path.join(out, f)), f
    rep = json.load(open(os.path.join(out, "report.json")))
    for k in ("test", "test_heldout_phrasings", "test_without_text", "test_without_image", "test_without_audio"):
        assert 0.0 <= rep[k]["accuracy"] <= 1.0 and set(rep[k]["per_type"]) == {"match", "sum", "heard", "written", "larger"}
    assert "test_without_audio" in r.stdout and rep["train"]["steps"] == 8


def logged(run_dir):
    """The metrics log without its wall-clock times, from both files."""
    import csv
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if k != "time"} for r in rows], \
        [(r["split"], int(r["step"])) for r in csv_rows]


def test_kill_mid_epoch_then_resume_is_exact(cache, full_run, tmp_path):
    out_a, _ = full_run
    out = str(tmp_path / "runB")
    # 4 steps an epoch, checkpoints at steps 3, 4 (epoch end), 6; SIGKILL right after step 7 (mid-epoch 1),
    # whose metrics row was already written: the resumed run must not log it twice
    r = run_cli(tiny_overrides(cache, out, log_every=1), env={"MMKERNELS_KILL_AT_STEP": "7"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)  # plain data only
    assert ck["state"]["global_step"] == 6 and ck["state"]["step_in_epoch"] == 2
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))][-1] == 7
    r = run_cli(tiny_overrides(cache, out, log_every=1) + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    wa, wb = weights(out_a), weights(out)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows_a, csv_a = logged(out_a)
    rows_b, csv_b = logged(out)
    assert rows_b == rows_a and csv_b == csv_a  # each step once, with the same values
    assert [r["step"] for r in rows_b if r["split"] == "train"] == list(range(1, 9))


def test_kill_during_checkpoint_save_keeps_the_previous_one(cache, full_run, tmp_path):
    """SIGKILL inside the atomic writer, between the temp file and the rename, at the step-6 checkpoint:
    the step-4 checkpoint stays whole, and the next start removes the temp file and resumes exactly."""
    out_a, _ = full_run
    out = str(tmp_path / "runC")
    r = run_cli(tiny_overrides(cache, out, log_every=1), env={"MMKERNELS_KILL_IN_SAVE_AT_STEP": "6"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    stale = [f for f in os.listdir(out) if f.startswith(".checkpoint.pt.tmp.")]
    assert len(stale) == 1 and os.path.getsize(os.path.join(out, stale[0])) > 0  # the kill landed mid-save
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["state"]["global_step"] == 4
    r = run_cli(tiny_overrides(cache, out, log_every=1) + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    assert not [f for f in os.listdir(out) if ".tmp" in f or ".old" in f]
    wa, wb = weights(out_a), weights(out)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert logged(out) == logged(out_a)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_clear_errors(cache, tmp_path, capsys):
    from mmkernels.train.cli import train_main
    out = str(tmp_path / "run")
    assert train_main(tiny_overrides(cache, out) + ["model.d_modle=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.d_modle'" in err and "d_model" in err
    cfgf = tmp_path / "bad.yaml"
    cfgf.write_text("train:\n  epochz: 3\n")
    assert train_main(["--config", str(cfgf)]) == 2
    assert "unknown config key 'train.epochz'" in capsys.readouterr().err
    assert train_main(tiny_overrides(cache, out) + ["--resume", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"\x80garbage")
    assert train_main(tiny_overrides(cache, out) + ["--resume"]) == 2
    assert "corrupt checkpoint" in capsys.readouterr().err
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train.pt").write_bytes(b"oops")
    assert train_main(tiny_overrides(cache, out) + [f"data.data_dir={bad}"]) == 2
    err = one_error_line(capsys)
    assert "malformed data file" in err and os.path.join(str(bad), "train.pt") in err


def test_user_errors_are_one_error_line_and_exit_2(cache, full_run, tmp_path, capsys, monkeypatch):
    import shutil
    from mmkernels.train.cli import train_main
    out_a, _ = full_run
    out = str(tmp_path / "run")
    # a crafted checkpoint cannot run code: it is refused, and what it would have done never happens
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    os.makedirs(out)
    torch.save({"format": 2, "model": RunsCode()}, os.path.join(out, "checkpoint.pt"))
    assert train_main(tiny_overrides(cache, out) + ["--resume"]) == 2
    assert "refused" in one_error_line(capsys) and not marker.exists()
    # the train set smaller than one batch
    assert train_main(tiny_overrides(cache, out, batch_size=128)) == 2
    assert "train set has 64 samples, fewer than one batch (train.batch_size=128)" in one_error_line(capsys)
    # a batch that does not split over the processes (checked before any process group starts)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert train_main(tiny_overrides(cache, out, batch_size=15)) == 2
    assert "train.batch_size (15) must be divisible by the number of processes (2)" in one_error_line(capsys)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    # resuming with another fine-tuning policy: same weights, other trained parameters and optimizer groups
    os.remove(os.path.join(out, "checkpoint.pt"))
    shutil.copy(os.path.join(out_a, "checkpoint.pt"), os.path.join(out, "checkpoint.pt"))
    assert train_main(tiny_overrides(cache, out, log_every=1) + ["model.text_finetune=frozen", "--resume"]) == 2
    err = one_error_line(capsys)
    assert "does not fit this run" in err and "model.text_finetune: 'all' -> 'frozen'" in err
    # ...and another model size
    assert train_main(tiny_overrides(cache, out, log_every=1) + ["model.d_model=16", "--resume"]) == 2
    err = one_error_line(capsys)
    assert "does not fit this run" in err and "model.d_model: 32 -> 16" in err
    # a wrong type in an override
    assert train_main(tiny_overrides(cache, out) + ["train.epochs=abc"]) == 2
    assert one_error_line(capsys) == "error: train.epochs expects an int, got 'abc'\n"


def test_eval_and_predict(full_run, tmp_path, capsys):
    from PIL import Image
    from mmkernels.data.avmnist import load_mnist
    from mmkernels.data.speech import EspeakSynth, Speaker
    from mmkernels.train.cli import eval_main, predict_main
    out, _ = full_run
    assert eval_main(["--model", os.path.join(out, "best"), "--output", str(tmp_path / "rep.json"),
                      "--backend", "reference"]) == 0
    assert "test_without_image" in capsys.readouterr().out
    assert json.load(open(tmp_path / "rep.json"))["test"]["n"] == 32
    (x, _), _, _ = load_mnist()
    Image.fromarray(x[0]).save(tmp_path / "d.png")
    import wave
    import numpy as np
    w = EspeakSynth().synth("five", Speaker("en", "m3", 150, 50, 50))
    with wave.open(str(tmp_path / "five.wav"), "wb") as f:
        f.setnchannels(1); f.setsampwidth(2); f.setframerate(8000)
        f.writeframes((w * 32767).astype(np.int16).tobytes())
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"image": str(tmp_path / "d.png"), "audio": str(tmp_path / "five.wav"),
                             "question": "Which digit is spoken?"}) + "\n")
    assert predict_main(["--model", os.path.join(out, "best"), "--input", str(q), "--output", str(tmp_path / "p.jsonl")]) == 0
    recs = [json.loads(l) for l in open(tmp_path / "p.jsonl")]
    assert len(recs) == 1 and recs[0]["answer"] in [str(i) for i in range(19)] + ["yes", "no"]
    assert 0 <= recs[0]["score"] <= 1 and len(recs[0]["top"]) == 3
    # the saved folder carries how inputs were prepared in training, and its tokenizer
    best = os.path.join(out, "best")
    prep = json.load(open(os.path.join(best, "preprocessing.json")))
    run_cfg = json.load(open(os.path.join(out, "run_config.json")))
    assert prep["max_text_len"] == run_cfg["data"]["max_text_len"]
    assert prep["max_audio_seconds"] == run_cfg["data"]["max_audio_seconds"] and prep["sample_rate"] == 8000
    assert os.path.exists(os.path.join(best, "tokenizer_config.json"))
    # a folder saved without them (older runs) still serves, with the package tokenizer and defaults
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(best, bare, ignore=shutil.ignore_patterns("preprocessing.json", "tokenizer*", "vocab*",
                                                               "special_tokens*"))
    assert predict_main(["--model", str(bare), "--input", str(q), "--output", str(tmp_path / "p2.jsonl")]) == 0
    assert [json.loads(l)["answer"] for l in open(tmp_path / "p2.jsonl")] == [recs[0]["answer"]]
    assert predict_main(["--model", os.path.join(out, "best"), "--image", str(tmp_path / "d.png"),
                         "--audio", str(tmp_path / "missing.wav"), "-q", "What?"]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_eval_and_predict_do_not_import_the_training_loop(full_run, tmp_path):
    """mmkernels-eval and mmkernels-predict, run to the end in a fresh process (an error path too), load
    nothing of the training loop: mmkernels.train.trainer stays out of sys.modules."""
    import wave

    import numpy as np
    from PIL import Image
    out, _ = full_run
    best = os.path.join(out, "best")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "d.png")
    with wave.open(str(tmp_path / "x.wav"), "wb") as f:
        f.setnchannels(1); f.setsampwidth(2); f.setframerate(8000)
        f.writeframes(np.zeros(4000, np.int16).tobytes())
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"image": "d.png", "audio": "x.wav", "question": "Which digit is spoken?"}) + "\n")
    code = "\n".join([
        "import sys",
        "import mmkernels.train.eval, mmkernels.train.predict",
        "from mmkernels.train.cli import eval_main, predict_main",
        f"assert eval_main(['--model', {best!r}, '--backend', 'reference', '-o', {str(tmp_path / 'r.json')!r}]) == 0",
        f"assert predict_main(['--model', {best!r}, '--input', {str(q)!r}, '-o', {str(tmp_path / 'p.jsonl')!r}]) == 0",
        f"assert predict_main(['--model', {best!r}]) == 2",
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('mmkernels.train'))))"])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = r.stdout.splitlines()[-1].split()
    assert "mmkernels.train.evaluation" in loaded and "mmkernels.train.cli" in loaded, loaded
    assert "mmkernels.train.trainer" not in loaded, loaded
    assert json.load(open(tmp_path / "r.json"))["test"]["n"] == 32
    assert len(open(tmp_path / "p.jsonl").read().splitlines()) == 1


def test_print_config_shows_every_key_with_overrides(capsys):
    import yaml
    from mmkernels.train.cli import train_main
    assert train_main(["--config", os.path.join(ROOT, "configs", "quick.yaml"), "--print-config",
                       "train.epochs=2", "model.d_model=32"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["epochs"] == 2 and cfg["model"]["d_model"] == 32
    assert {"data", "model", "train"} <= set(cfg) and "max_text_len" in cfg["data"]
