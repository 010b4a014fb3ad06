"""Run configuration: values typed from the config dataclasses, whatever their YAML / CLI spelling,
from the file and from overrides alike; a wrong type is one `error:` line and exit code 2."""
import pytest

from mmkernels.train.config import ConfigError, load_config


@pytest.mark.parametrize("spelling, value", [("1e-3", 1e-3), ("1.0e-3", 1e-3), ("3", 3.0), ('"3"', 3.0),
                                             ("0.5", 0.5), ("+2E+1", 20.0), ("2E-1", 0.2)])
def test_float_in_any_spelling(spelling, value, tmp_path):
    cfg = load_config(None, [f"train.lr={spelling}"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(value)
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  lr: {spelling}\n  text_lr: {spelling}\n")
    cfg = load_config(str(f))
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(value)
    assert isinstance(cfg.train.text_lr, float) and cfg.train.text_lr == pytest.approx(value)


def test_ints_bools_lists_and_optionals(tmp_path):
    cfg = load_config(None, ['train.epochs="3"', "train.max_steps=1e3", "train.progress=false", "train.plot=no",
                             "model.modalities=[image, audio]", "model.labels=[yes, no]", "train.text_lr=null",
                             "train.output_dir=2024", "train.amp=none", "data.cache_dir=~/c"])
    t = cfg.train
    assert t.epochs == 3 and isinstance(t.epochs, int) and t.max_steps == 1000 and isinstance(t.max_steps, int)
    assert t.progress is False and t.plot is False and t.text_lr is None
    assert cfg.model.modalities == ["image", "audio"]
    assert cfg.model.labels == ["yes", "no"]  # strings, not YAML 1.1 booleans
    assert t.output_dir == "2024" and t.amp == "none" and cfg.data.cache_dir == "~/c"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: '4'\n  progress: off\n  final_eval: True\n  max_minutes: 1\n"
                 "model:\n  labels: [on, off, 3]\n  dropout: 1e-1\n")
    cfg = load_config(str(f))
    assert cfg.train.epochs == 4 and cfg.train.progress is False and cfg.train.final_eval is True
    assert isinstance(cfg.train.max_minutes, float) and cfg.model.dropout == pytest.approx(0.1)
    assert cfg.model.labels == ["on", "off", "3"]


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs expects an int, got 'abc'"),
    ("train.epochs=2.5", "train.epochs expects an int, got 2.5"),
    ("train.epochs=true", "train.epochs expects an int, got True"),
    ("train.lr=fast", "train.lr expects a number, got 'fast'"),
    ("train.progress=maybe", "train.progress expects true or false, got 'maybe'"),
    ("model.modalities=image", "model.modalities expects a list of strings, got 'image'"),
    ("train.text_lr=[1]", "train.text_lr expects a number or null, got [1]"),
    ("train.metric=[a]", "train.metric expects a string, got ['a']"),
])
def test_wrong_type_names_key_type_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_wrong_type_in_the_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: abc\n")
    with pytest.raises(ConfigError, match=r"^train.epochs expects an int, got 'abc' \(in .*bad.yaml\)$"):
        load_config(str(f))


def test_cli_wrong_type_is_one_error_line_and_exit_2(capsys):
    from mmkernels.train.cli import train_main
    assert train_main(["train.epochs=abc", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err == "error: train.epochs expects an int, got 'abc'\n"


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.amp=fp8", "train.amp must be one of ['auto', 'bf16', 'none'], got 'fp8'"),
    ("train.device=tpu", "train.device must be one of ['auto', 'cpu', 'cuda'], got 'tpu'"),
    ("data.dataset=imagenet", "data.dataset must be one of ['avmnist', 'jsonl'], got 'imagenet'"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]") + "$"):
        load_config(None, [override])


def test_print_config_round_trips(tmp_path, capsys):
    """--print-config output read back as a config file gives the same config (strings stay strings)."""
    from mmkernels.train.cli import train_main
    ov = ["model.labels=[yes, no, '1e3']", "train.lr=1e-4", "train.amp=none"]
    assert train_main(ov + ["--print-config"]) == 0
    f = tmp_path / "printed.yaml"
    f.write_text(capsys.readouterr().out)
    assert load_config(str(f)).to_dict() == load_config(None, ov).to_dict()
    assert load_config(str(f)).model.labels == ["yes", "no", "1e3"]


@pytest.mark.parametrize("override, message", [
    ("data.max_audio_seconds=0", "data.max_audio_seconds must be > 0, got 0.0"),
    ("model.d_model=0", "model.d_model must be >= 1, got 0"),
    ("model.num_heads=3", "model.d_model (64) must be divisible by model.num_heads (3)"),
    ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5"),
    ("model.fusion_layers=-1", "model.fusion_layers must be >= 0, got -1"),
])
def test_model_and_data_values_out_of_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize("text", ["1.5", "2024-01-01", "1e3", "010", "12:30", "yes", "0x1F"])
def test_a_string_value_is_typed_alike_from_the_file_and_an_override(text, tmp_path):
    """A string field (and the items of a list of strings) takes the text as written, whatever YAML would
    make of it, from the file as from an override; --print-config gives it back unchanged."""
    from mmkernels.train.config import yaml_dump
    by_override = load_config(None, [f"train.output_dir={text}", f"model.labels=[{text}, b]"])
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  output_dir: {text}\nmodel:\n  labels: [{text}, b]\n")
    by_file = load_config(str(f))
    assert by_file.train.output_dir == by_override.train.output_dir == text
    assert by_file.model.labels == by_override.model.labels == [text, "b"]
    printed = tmp_path / "printed.yaml"
    printed.write_text(yaml_dump(by_file.to_dict()))
    assert load_config(str(printed)).to_dict() == by_file.to_dict()


@pytest.mark.parametrize("text, message", [
    ("null", "train.output_dir expects a string, got None"),
    ("[a]", "train.output_dir expects a string, got ['a']"),
    ("2024-01-01", "train.lr expects a number, got '2024-01-01'"),
])
def test_a_wrong_type_is_refused_alike_from_the_file_and_an_override(text, message, tmp_path):
    key = message.split(" ")[0]
    with pytest.raises(ConfigError) as by_override:
        load_config(None, [f"{key}={text}"])
    sec, k = key.split(".")
    f = tmp_path / "c.yaml"
    f.write_text(f"{sec}:\n  {k}: {text}\n")
    with pytest.raises(ConfigError) as by_file:
        load_config(str(f))
    assert str(by_override.value) == message
    assert str(by_file.value) == f"{message} (in {f})"


@pytest.mark.parametrize("override, message", [
    ("train.grad_clip=nan", "train.grad_clip must be >= 0, got nan"),
    ("train.weight_decay=.nan", "train.weight_decay must be >= 0, got nan"),
    ("train.max_minutes=nan", "train.max_minutes must be >= 0, got nan"),
    ("train.lr=0", "train.lr must be > 0 (and finite), got 0.0"),
    ("train.lr=-1e-3", "train.lr must be > 0 (and finite), got -0.001"),
    ("train.lr=nan", "train.lr must be > 0 (and finite), got nan"),
    ("train.lr=.inf", "train.lr must be > 0 (and finite), got inf"),
    ("train.text_lr=-1e-3", "train.text_lr must be >= 0 (and finite) or null, got -0.001"),
    ("train.text_lr=nan", "train.text_lr must be >= 0 (and finite) or null, got nan"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio must be in [0, 1], got 1.5"),
    ("train.min_lr_ratio=-0.1", "train.min_lr_ratio must be in [0, 1], got -0.1"),
    ("train.min_lr_ratio=nan", "train.min_lr_ratio must be in [0, 1], got nan"),
    ("model.aux_digit_loss=nan", "model.aux_digit_loss must be >= 0, got nan"),
    ("model.dropout=nan", "model.dropout must be in [0, 1), got nan"),
])
def test_nan_and_out_of_range_rates(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).endswith(message), str(e.value)


def test_edge_rates_are_accepted():
    t = load_config(None, ["train.text_lr=0", "train.min_lr_ratio=0", "train.grad_clip=0"]).train
    assert (t.text_lr, t.min_lr_ratio, t.grad_clip) == (0.0, 0.0, 0.0)
    assert load_config(None, ["train.min_lr_ratio=1", "train.text_lr=null"]).train.min_lr_ratio == 1.0


def test_entity_f1_needs_token_classification():
    """Checked with the rest of the config (--print-config too), not when the trainer starts."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.metric=entity_f1"])
    assert str(e.value) == ("train.metric entity_f1 needs model.task=token_classification "
                            "(model.task is 'answer'); other tasks: accuracy | macro_f1")
    cfg = load_config(None, ["train.metric=entity_f1", "model.task=token_classification"])
    assert cfg.train.metric == "entity_f1"


def test_only_the_first_process_prints_the_error_line(monkeypatch, capsys):
    from mmkernels.train.cli import train_main
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, printed in (("1", ""), ("0", "error: train.epochs expects an int, got 'abc'\n")):
        monkeypatch.setenv("RANK", rank)
        assert train_main(["train.epochs=abc", "--print-config"]) == 2
        assert capsys.readouterr().err == printed


def test_tiny_and_jsonl_test_runs_share_their_train_settings():
    """The two test-run helpers draw their train settings from one dict (TINY_TRAIN): each adds only
    what differs, and keyword arguments win over both."""
    from train_fixtures import TINY_TRAIN, jsonl_overrides, tiny_overrides

    def train_of(overrides):
        return load_config(None, overrides).train

    files = {"train": "t.jsonl", "val": "v.jsonl", "test": "e.jsonl"}
    tiny, js = train_of(tiny_overrides("c", "out")), train_of(jsonl_overrides(files, "out"))
    for k, v in TINY_TRAIN.items():
        assert getattr(tiny, k) == getattr(js, k) == v, k
    assert (tiny.ckpt_every, tiny.eval_batch_size) == (3, 32) and js.eval_batch_size == 64
    assert train_of(tiny_overrides("c", "out", lr=0.5)).lr == train_of(jsonl_overrides(files, "out", lr=0.5)).lr == 0.5


def test_shipped_configs_load():
    """Every config in configs/ names only known keys with values of their types."""
    import glob
    import os
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(files) >= 5
    for f in files:
        cfg = load_config(f)
        assert cfg.train.output_dir.startswith("runs/"), f
    sp = load_config(os.path.join(root, "speakers.yaml"))
    assert sp.data.test_speaker and sp.data.speech_dir and sp.model.audio_frontend == "conv2d"
