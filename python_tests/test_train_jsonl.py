"""Training on your own data (data.dataset=jsonl): classification and token classification from
JSON lines of text + image file + WAV file, the report (entity F1 for tagging), eval and predict."""
import json
import os
import wave

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import TINY_MODEL  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """64/16/16 records: an MNIST image, a spoken digit, a sentence naming both digits."""
    from PIL import Image
    from mmkernels.data.avmnist import load_mnist
    from mmkernels.data.speech import EspeakSynth, Speaker

    d = tmp_path_factory.mktemp("jsonl")
    (x, y), _, _ = load_mnist()
    synth, speaker = EspeakSynth(), Speaker("en", "m3", 150, 50, 50)
    rng = np.random.default_rng(0)
    clips = {}
    for w in range(10):
        clips[w] = f"audio/{WORDS[w]}.wav"
        os.makedirs(d / "audio", exist_ok=True)
        with wave.open(str(d / clips[w]), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(8000)
            f.writeframes((synth.synth(WORDS[w], speaker) * 32767).astype(np.int16).tobytes())
    os.makedirs(d / "img", exist_ok=True)
    out = {}
    for split, n, start in (("train", 64, 0), ("val", 16, 64), ("test", 16, 80)):
        cls, tag = [], []
        for i in range(start, start + n):
            Image.fromarray(x[i]).save(d / "img" / f"{i}.png")
            heard = int(rng.integers(10))
            tokens = ["i", "see", WORDS[int(y[i])], "and", "hear", WORDS[heard]]
            common = {"image": f"img/{i}.png", "audio": clips[heard]}
            cls.append({**common, "text": "is the written digit bigger?",
                        "label": "yes" if int(y[i]) > heard else "no"})
            tag.append({**common, "tokens": tokens, "tags": ["O", "O", "B-SEEN", "O", "O", "B-HEARD"]})
        for name, recs in (("cls", cls), ("tag", tag)):
            (d / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            out[f"{name}_{split}"] = str(d / f"{name}_{split}.jsonl")
    return out


def _overrides(files, kind, task, out_dir, **extra):
    train = {"batch_size": 16, "epochs": 2, "lr": 1e-3, "warmup_steps": 2, "progress": False, "plot": False,
             "num_threads": 1, "eval_batch_size": 32, "output_dir": out_dir, **extra}
    return ["data.dataset=jsonl", f"data.train_file={files[kind + '_train']}",
            f"data.val_file={files[kind + '_val']}", f"data.test_file={files[kind + '_test']}",
            f"model.task={task}", "model.aux_digit_loss=0.0"] + \
        [o for o in TINY_MODEL if not o.startswith("model.aux")] + [f"train.{k}={v}" for k, v in train.items()]


def test_classification_trains_reports_evaluates_and_predicts(files, tmp_path, capsys):
    from mmkernels.train.cli import eval_main, predict_main, train_main

    out = str(tmp_path / "cls")
    assert train_main(_overrides(files, "cls", "classification", out)) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert set(rep) >= {"train", "test", "test_without_text", "test_without_image", "test_without_audio"}
    assert 0.0 <= rep["test"]["accuracy"] <= 1.0 and rep["test"]["n"] == 16 and rep["test"]["per_type"] == {}
    per_class = rep["test"]["per_class"]  # sklearn's classification report, for the test split only
    assert set(per_class) <= {"no", "yes"} and sum(r["support"] for r in per_class.values()) == 16
    assert "per_class" not in rep["test_without_audio"]
    saved = json.load(open(os.path.join(out, "best", "config.json")))
    assert saved["labels"] == ["no", "yes"] and saved["num_labels"] == 2
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # run_config.json holds absolute data paths: eval works from any folder
    try:
        assert eval_main(["--model", os.path.join(out, "best")]) == 0
    finally:
        os.chdir(cwd)
    assert "test_without_audio" in capsys.readouterr().out
    # predict takes the training files' own lines: "text" field, paths relative to the file
    assert predict_main(["--model", os.path.join(out, "best"), "--input", files["cls_test"],
                         "-o", str(tmp_path / "p.jsonl")]) == 0
    preds = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert len(preds) == 16 and all(p["answer"] in ("yes", "no") for p in preds)
    # scored against AV-MNIST answers (no run_config.json next to the copied folder): refused up front
    import shutil
    shutil.copytree(os.path.join(out, "best"), tmp_path / "copied")
    assert eval_main(["--model", str(tmp_path / "copied")]) == 2
    assert "not the AV-MNIST answers" in capsys.readouterr().err


def test_token_classification_reports_entity_f1(files, tmp_path):
    from mmkernels.train.cli import train_main

    out = str(tmp_path / "tag")
    assert train_main(_overrides(files, "tag", "token_classification", out, metric="entity_f1", epochs=4)) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert 0.0 <= rep["test"]["entity_f1"] <= 1.0 and 0.0 <= rep["test"]["accuracy"] <= 1.0
    per_entity = rep["test"]["per_entity"]  # seqeval's per-type report
    assert set(per_entity) <= {"HEARD", "SEEN"} and all(r["support"] == 16 for r in per_entity.values())
    saved = json.load(open(os.path.join(out, "best", "config.json")))
    assert saved["labels"] == ["O", "B-HEARD", "B-SEEN"]
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in logged)  # per scored word, not per sentence
    assert all("entity_f1" in r for r in logged if r.get("split") == "val")


def test_tags_bio_strings_and_truncation_is_reported(tmp_path):
    from mmkernels.data.jsonl import JsonlDataset, JsonlFormatError, label_names, read_jsonl
    from mmkernels.models.text import load_tokenizer

    f = tmp_path / "t.jsonl"
    long_tokens = ["w"] * 30 + ["paris"]
    f.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "B-X"]}) + "\n"
                 + json.dumps({"tokens": long_tokens, "tags": ["O"] * 30 + ["B-LOC"]}) + "\n")
    recs = read_jsonl(str(f), "token_classification", ["text"])
    labels = label_names(recs, "token_classification")
    assert labels == ["O", "B-LOC", "B-X"]
    with pytest.warns(UserWarning, match=r"21 words \(1 entities\) lie past data.max_text_len=12"):
        ds = JsonlDataset(str(f), load_tokenizer(), labels, "token_classification", ["text"], max_text_len=12)
    assert ds.truncated_entities == 1 and int((ds.labels[1] != -100).sum()) == 10
    f.write_text(json.dumps({"tokens": ["a"], "tags": ["PER"]}) + "\n")
    with pytest.raises(JsonlFormatError, match=r"t.jsonl:1: tags must be BIO"):
        read_jsonl(str(f), "token_classification", ["text"])
    f.write_text(json.dumps({"tokens": ["a", "b"], "tags": [0, 1]}) + "\n")
    with pytest.raises(JsonlFormatError, match=r"tags must be BIO .*'0'"):  # ints become strings first
        read_jsonl(str(f), "token_classification", ["text"])


def test_bad_files_name_the_line_and_field(files, tmp_path, capsys):
    from mmkernels.train.cli import train_main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "image": "a.png", "label": "yes"}) + "\n")  # no audio
    ov = _overrides(files, "cls", "classification", str(tmp_path / "o"))
    ov = [o if not o.startswith("data.train_file=") else f"data.train_file={bad}" for o in ov]
    assert train_main(ov) == 2
    assert "bad.jsonl:1: missing field(s) ['audio']" in capsys.readouterr().err
    ov = _overrides(files, "cls", "classification", str(tmp_path / "o"), metric="entity_f1")
    assert train_main(ov) == 2
    assert "train.metric" in capsys.readouterr().err
