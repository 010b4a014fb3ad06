"""The torch.export deployment path: `mmkernels-predict --export DIR` writes the model as an exported
program (model.pt2, torch.export.save) that calls the mmkernels custom ops (not the reference
fallback), with the config, preprocessing and tokenizer; `--model DIR` serves it with the eager model's
answers, bit for bit, in a process that loads neither the model's Python code nor the text encoder's."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import jsonl_overrides, write_digit_jsonl  # noqa: E402
from utils import require_backend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["mmkernels.cross_modal_attention_fwd", "mmkernels.gated_fusion_fwd"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mmkernels.train.cli import train_main
    d = tmp_path_factory.mktemp("digits")
    files = write_digit_jsonl(str(d), n_train=32, n_val=16, n_test=70)
    out = str(d / "run")
    assert train_main(jsonl_overrides(files, out, epochs=1)) == 0
    return os.path.join(out, "best"), files["test"]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from mmkernels.train.cli import predict_main
    require_backend("cpu", "cpu")
    best, _ = trained
    folder = str(tmp_path_factory.mktemp("exported") / "model")
    assert predict_main(["--model", best, "--export", folder]) == 0
    return folder


def test_the_program_calls_the_mmkernels_ops(trained, exported, capsys):
    from mmkernels.models.fusion_model import FusionModel
    from mmkernels.nn.attention import CrossModalAttention
    assert sorted(os.listdir(exported)) == sorted(["config.json", "model.pt2", "preprocessing.json",
                                                   "tokenizer.json", "tokenizer_config.json"])
    program = torch.export.load(os.path.join(exported, "model.pt2"))
    calls = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    attention = sum(isinstance(m, CrossModalAttention) for m in FusionModel.from_pretrained(trained[0]).modules())
    assert calls.count("mmkernels.cross_modal_attention_fwd.default") == attention  # every attention, none on
    assert calls.count("mmkernels.gated_fusion_fwd.default") == 1                  # the reference's math
    assert not any("softmax" in c for c in calls)
    from mmkernels.train.cli import predict_main
    capsys.readouterr()
    out = os.path.join(os.path.dirname(exported), "again")
    assert predict_main(["--model", trained[0], "--export", out]) == 0
    assert json.loads(capsys.readouterr().out) == {"exported": out, "mmkernels_ops": OPS}
    # the reference backend, asked for, is what gets exported: no custom op then
    assert predict_main(["--model", trained[0], "--backend", "reference", "--export", out]) == 0
    assert json.loads(capsys.readouterr().out)["mmkernels_ops"] == []


def test_exported_answers_are_the_eager_models(trained, exported, tmp_path):
    from mmkernels.train.cli import predict_main
    from mmkernels.train.inference import Predictor, QueryDataset, collate, read_queries
    best, queries = trained
    for model, name in ((best, "eager.jsonl"), (exported, "exported.jsonl")):
        assert predict_main(["--model", model, "--input", queries, "-o", str(tmp_path / name)]) == 0
    eager = open(tmp_path / "eager.jsonl").read()
    assert len(eager.splitlines()) == 70 and open(tmp_path / "exported.jsonl").read() == eager
    logits = []
    for model in (best, exported):
        pred = Predictor(model)
        qs = read_queries(queries)
        ds = QueryDataset(qs, pred.prep, queries, os.path.dirname(queries))
        logits.append(pred.logits(pred.inputs(collate([ds[i] for i in range(len(qs))]))))
        assert pred.exported == (model == exported)
    assert torch.equal(logits[0], logits[1])
    # any batch size: the batch dimension is dynamic
    pred = Predictor(exported)
    x = pred.inputs(collate([ds[i] for i in range(3)]))
    from mmkernels.models.export import INPUTS
    torch.testing.assert_close(pred.program(*(x[k] for k in INPUTS)), logits[0][:3], rtol=1e-5, atol=1e-6)


def test_served_without_the_model_code(trained, exported, tmp_path):
    """A fresh process answers with the exported folder and never imports the FusionModel's modules,
    nor transformers' BERT: the program holds the whole computation."""
    _, queries = trained
    code = "\n".join([
        "import sys",
        "from mmkernels.train.cli import predict_main",
        f"assert predict_main(['--model', {exported!r}, '--input', {queries!r}, '-o', {str(tmp_path / 'p.jsonl')!r}]) == 0",
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('mmkernels', 'transformers.models')))))"])
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = r.stdout.split()
    for name in ("mmkernels.models.fusion_model", "mmkernels.models.encoders", "mmkernels.nn.attention",
                 "transformers.models.bert.modeling_bert", "mmkernels.train.trainer"):
        assert name not in loaded, (name, loaded)
    assert len(open(tmp_path / "p.jsonl").read().splitlines()) == 70


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_export_errors(trained, exported, tmp_path, capsys):
    from mmkernels.train.cli import predict_main
    best, queries = trained
    (tmp_path / "file").write_text("x")
    assert predict_main(["--model", best, "--export", str(tmp_path / "file" / "out")]) == 2
    assert one_error_line(capsys).startswith(f"error: --export {tmp_path / 'file' / 'out'} cannot be written: ")
    assert not os.path.exists(tmp_path / "file" / "out")
    assert predict_main(["--model", exported, "--export", str(tmp_path / "again")]) == 2
    assert "is already an exported program" in one_error_line(capsys)
    assert predict_main(["--model", best, "--export", str(tmp_path / "x"), "--input", queries]) == 2
    assert "--export writes the exported model and answers no queries" in one_error_line(capsys)
    assert predict_main(["--model", exported, "--backend", "reference", "--input", queries]) == 2
    assert "its ops are fixed at export" in one_error_line(capsys)
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "model.pt2").write_bytes(b"PK\x03\x04 not a program")
    assert predict_main(["--model", str(broken), "--input", queries]) == 2
    assert one_error_line(capsys).startswith(f"error: corrupt exported program {broken / 'model.pt2'}: ")
