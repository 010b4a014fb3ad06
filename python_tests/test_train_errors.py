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
