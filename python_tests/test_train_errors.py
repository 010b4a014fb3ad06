"""User errors found once the data and the text encoder are known: one `error:` line, exit code 2."""
import pytest

pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import jsonl_overrides, write_digit_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_digit_jsonl(str(tmp_path_factory.mktemp("digits")), n_train=32, n_val=16, n_test=16)


@pytest.mark.parametrize("overrides, message", [
    (["data.max_text_len=100"], "data.max_text_len (100) is more than the text encoder's 64 positions"),
    (["model.text_encoder=minilm", "model.text_model_path=/no/such/folder"],
     "model.text_model_path: /no/such/folder is not a folder"),
])
def test_errors_after_the_config(files, tmp_path, capsys, overrides, message):
    from mmkernels.train.cli import train_main
    assert train_main(jsonl_overrides(files, str(tmp_path / "run")) + overrides) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_output_dir_that_is_a_file(files, tmp_path, capsys):
    from mmkernels.train.cli import train_main
    (tmp_path / "taken").write_text("x")
    assert train_main(jsonl_overrides(files, str(tmp_path / "taken"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.output_dir ") and err.count("\n") == 1 and "is not a folder" in err, err


@pytest.mark.parametrize("contents", [(), ("config.json",)])
def test_text_model_path_that_is_not_a_model_folder(files, tmp_path, capsys, contents):
    """An existing folder without a BERT-family model in it (empty, or a config.json without weights or
    tokenizer): one error line that names model.text_model_path and the folder."""
    import os
    import shutil

    from mmkernels.models.text import minilm_path
    from mmkernels.train.cli import train_main
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    for name in contents:
        shutil.copy(os.path.join(minilm_path(), name), folder / name)
    assert train_main(jsonl_overrides(files, str(tmp_path / "run")) + [
        "model.text_encoder=minilm", f"model.text_model_path={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.text_model_path: ") and err.count("\n") == 1, err
    assert str(folder) in err and "Traceback" not in err


def test_resume_refuses_other_data_order_or_lr_schedule(files, tmp_path, capsys):
    """Exact resume: a run whose batches or learning rates would differ from the checkpoint's run is
    refused, naming every change; settings that change neither (logging, evaluation) are accepted."""
    from mmkernels.train.cli import train_main
    out = str(tmp_path / "run")
    assert train_main(jsonl_overrides(files, out, epochs=1)) == 0
    capsys.readouterr()
    changed = {"batch_size": 8, "seed": 1, "epochs": 3, "max_steps": 5, "warmup_steps": 1, "min_lr_ratio": 0.5,
               "lr": 0.01, "text_lr": 0.001, "weight_decay": 0.1}
    for k, v in changed.items():
        assert train_main(jsonl_overrides(files, out, **{"epochs": 1, k: v}) + ["--resume"]) == 2, k
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "does not fit this run" in err and f"train.{k}: " in err and f"-> {v!r}" in err, err
    assert train_main(jsonl_overrides(files, out, epochs=1, seed=2, lr=0.5) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.5; train.seed: 0 -> 2" in err, err
    assert train_main(jsonl_overrides(files, out, epochs=1, log_every=1, eval_every=1) + ["--resume"]) == 0


def test_output_dir_that_cannot_be_made(files, tmp_path, capsys):
    """A parent of train.output_dir is a file: the OS refuses the folder, one error line with its reason."""
    from mmkernels.train.cli import train_main
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" / "run"
    assert train_main(jsonl_overrides(files, str(out))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: train.output_dir {out} cannot be made: ") and err.count("\n") == 1, err
    assert "Not a directory" in err, err


def test_unreadable_files_of_the_data_name_the_file_and_line(files, tmp_path, capsys):
    """An image or WAV of a JSON lines file that cannot be read (train or eval), or a path that is not a
    string: one error line naming the data file, its line and the file."""
    import json
    import os
    from mmkernels.train.cli import eval_main, train_main
    lines = open(files["train"]).read().splitlines()
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    bad = tmp_path / "train.jsonl"
    base = os.path.dirname(files["train"])
    recs = [dict(json.loads(line), image=os.path.join(base, json.loads(line)["image"]),
                 audio=os.path.join(base, json.loads(line)["audio"])) for line in lines]
    for field, value, message in (("image", str(tmp_path / "corrupt.png"),
                                   f"cannot read image file {tmp_path / 'corrupt.png'}: not an image file Pillow can read"),
                                  ("audio", str(tmp_path / "gone.wav"), f"audio file not found: {tmp_path / 'gone.wav'}"),
                                  ("image", ["a.png"], "field 'image' must be a file path (a string), got [\"a.png\"]")):
        bad.write_text("".join(json.dumps(dict(r, **({field: value} if i == 2 else {}))) + "\n"
                               for i, r in enumerate(recs)))
        ov = [o if not o.startswith("data.train_file=") else f"data.train_file={bad}"
              for o in jsonl_overrides(files, str(tmp_path / "run"), epochs=1)]
        assert train_main(ov) == 2
        err = capsys.readouterr().err
        assert err == f"error: {bad}:3: {message}\n", err
    # eval of a trained model on a test file with a missing WAV
    out = str(tmp_path / "good")
    assert train_main(jsonl_overrides(files, out, epochs=1)) == 0
    capsys.readouterr()
    bad.write_text("".join(json.dumps(dict(r, **({"audio": str(tmp_path / "gone.wav")} if i == 5 else {}))) + "\n"
                           for i, r in enumerate(recs)))
    assert eval_main(["--model", os.path.join(out, "best"), f"data.test_file={bad}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}:6: audio file not found: {tmp_path / 'gone.wav'}\n", err
