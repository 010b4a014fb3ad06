"""Batched mmkernels-predict: the same answers, byte for byte, whatever the batch size and the number of
reading processes, in input order; one model forward per 64 rows; a progress bar on a terminal only;
usage errors as one `error:` line."""
import json
import os
import wave

import numpy as np
import pytest

pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import jsonl_overrides, write_digit_jsonl  # noqa: E402

QUESTIONS = ["which digit is written?", "what is it", "tell me the digit that is written in the picture, please",
             "digit?"]


@pytest.fixture(scope="module")
def model_and_queries(tmp_path_factory):
    """A tiny trained model and 100 queries of other images, questions and audio lengths."""
    from mmkernels.train.cli import train_main
    d = tmp_path_factory.mktemp("digits")
    files = write_digit_jsonl(str(d), n_train=32, n_val=16, n_test=100)
    out = str(d / "run")
    assert train_main(jsonl_overrides(files, out, epochs=1)) == 0
    rng = np.random.default_rng(1)
    for i, n in enumerate((200, 1500, 4000, 9000)):  # 9000 samples: longer than the 1 s kept
        with wave.open(str(d / f"a{i}.wav"), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(8000)
            f.writeframes((rng.uniform(-0.5, 0.5, n) * 32767).astype(np.int16).tobytes())
    lines = []
    for i, line in enumerate(open(files["test"])):
        r = json.loads(line)
        lines.append(json.dumps({"id": i, "image": r["image"], "audio": f"a{i % 4}.wav",
                                 "question": QUESTIONS[i % 3 if i % 7 else 3]}) + "\n")
    q = d / "queries.jsonl"
    q.write_text("".join(lines))
    return os.path.join(out, "best"), str(q)


def predict(model, queries, out, *extra):
    from mmkernels.train.cli import predict_main
    assert predict_main(["--model", model, "--input", queries, "-o", str(out), *extra]) == 0
    return open(out).read()


def test_batched_answers_are_those_of_one_at_a_time(model_and_queries, tmp_path, capsys):
    model, queries = model_and_queries
    one = predict(model, queries, tmp_path / "one.jsonl", "--batch-size", "1", "--workers", "0")
    rows = [json.loads(line) for line in one.splitlines()]
    assert [r["id"] for r in rows] == list(range(100))  # input order
    assert len({r["score"] for r in rows}) > 10  # the queries differ: a test that can fail
    for extra in (["--batch-size", "64", "--workers", "1"], ["--batch-size", "7", "--workers", "2"],
                  ["--batch-size", "100", "--workers", "0"], []):
        assert predict(model, queries, tmp_path / "b.jsonl", *extra) == one, extra
    from mmkernels.train.cli import predict_main
    capsys.readouterr()
    assert predict_main(["--model", model, "--input", queries]) == 0  # to stdout
    assert capsys.readouterr().out == one


def test_logits_do_not_depend_on_the_batch_bit_for_bit(model_and_queries):
    """Below the JSON's 4 decimals: each query's logits are the same bits alone, in a batch of 100 and
    at another place in it (the rounding of small-batch matrix kernels differs, hence the fixed blocks)."""
    import torch
    from mmkernels.train.inference import Predictor, QueryDataset, collate, read_queries
    model, queries = model_and_queries
    pred = Predictor(model)
    qs = read_queries(queries)
    ds = QueryDataset(qs, pred.prep, queries, os.path.dirname(queries))
    inputs = pred.inputs(collate([ds[i] for i in range(len(qs))]))
    batch = pred.logits(inputs)
    alone = torch.cat([pred.logits({k: v[i:i + 1] for k, v in inputs.items()}) for i in range(len(qs))])
    assert torch.equal(batch, alone)
    assert torch.equal(pred.logits({k: v.flip(0) for k, v in inputs.items()}), batch.flip(0))
    assert len(torch.unique(batch[:, 0])) > 10


def test_one_forward_per_64_rows(model_and_queries, tmp_path, monkeypatch):
    from mmkernels.models.fusion_model import FusionModel
    model, queries = model_and_queries
    rows = []
    forward = FusionModel.forward

    def counting(self, batch, *a, **k):
        rows.append(batch["image"].shape[0])
        return forward(self, batch, *a, **k)

    monkeypatch.setattr(FusionModel, "forward", counting)
    predict(model, queries, tmp_path / "p.jsonl")
    assert rows == [64, 64]  # 100 queries: two forwards, the second padded
    rows.clear()
    predict(model, queries, tmp_path / "p.jsonl", "--batch-size", "200")
    assert rows == [64, 64]


def test_threads_set_for_the_run_and_restored(model_and_queries, tmp_path, monkeypatch):
    import torch
    from mmkernels.train import inference
    model, queries = model_and_queries
    seen = []
    answers = inference.Predictor.answers

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        return answers(self, *a, **k)

    monkeypatch.setattr(inference.Predictor, "answers", spy)
    before = torch.get_num_threads()
    assert predict(model, queries, tmp_path / "p1.jsonl", "--threads", "1")
    assert set(seen) == {1} and torch.get_num_threads() == before
    seen.clear()
    assert predict(model, queries, tmp_path / "p3.jsonl", "--threads", "3") and set(seen) == {3}
    seen.clear()
    default = max(1, len(os.sched_getaffinity(0)) - 1)  # a core left to the reading, whatever --workers
    assert predict(model, queries, tmp_path / "p.jsonl", "--workers", "0") == \
        predict(model, queries, tmp_path / "p2.jsonl", "--threads", str(default))
    assert set(seen) == {default}


def test_progress_bar_on_a_terminal_only(model_and_queries, tmp_path, capsys, monkeypatch):
    import sys
    model, queries = model_and_queries
    capsys.readouterr()
    predict(model, queries, tmp_path / "p.jsonl", "--batch-size", "16")
    assert capsys.readouterr().err == ""  # not a terminal: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    predict(model, queries, tmp_path / "p.jsonl", "--batch-size", "16")
    err = capsys.readouterr().err
    assert "predict:" in err and "/100 [" in err and "query/s" in err, err
    predict(model, queries, tmp_path / "p.jsonl", "--batch-size", "16", "--no-progress")
    assert capsys.readouterr().err == ""
    predict(model, queries, tmp_path / "p.jsonl", "--batch-size", "128")  # one batch: no bar
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--workers", "-1"], "error: --workers must be >= 0, got -1"),
    (["--batch-size", "x"], "error: mmkernels-predict: argument --batch-size: invalid int value: 'x'"),
    (["--top-k", "0"], "error: --top-k must be >= 1, got 0"),
    (["--max-audio-seconds", "0"], "error: --max-audio-seconds must be > 0, got 0.0"),
    (["--threads", "0"], "error: --threads must be >= 1, got 0"),
])
def test_usage_errors_are_one_line(model_and_queries, tmp_path, capsys, args, message):
    from mmkernels.train.cli import predict_main
    model, queries = model_and_queries
    try:
        rc = predict_main(["--model", model, "--input", queries, *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert capsys.readouterr().err == message + "\n"


def test_output_folder_and_queries_file_errors(model_and_queries, tmp_path, capsys):
    from mmkernels.train.cli import predict_main
    model, queries = model_and_queries
    (tmp_path / "taken").mkdir()
    assert predict_main(["--model", model, "--input", queries, "-o", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'taken'} is a folder\n"
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]
    (tmp_path / "file").write_text("x")
    assert predict_main(["--model", model, "--input", queries, "-o", str(tmp_path / "file" / "p.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --output {tmp_path / 'file' / 'p.jsonl'} cannot be written: ")
    assert predict_main(["--model", model, "--input", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: queries file not found: {tmp_path / 'none.jsonl'}\n"
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')
    assert predict_main(["--model", model, "--input", str(tmp_path / "latin1.jsonl")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'latin1.jsonl'}:2: not UTF-8 text")
