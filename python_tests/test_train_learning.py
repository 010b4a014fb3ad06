"""Training learns: a tiny run on an easy task (which of four MNIST digits is written) reaches >= 90 %
test accuracy in 64 steps, where the same run without effective updates (lr 1e-12: train.lr must be
> 0) stays near chance (25 %)."""
import json
import os

import pytest

pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import jsonl_overrides, write_digit_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_digit_jsonl(str(tmp_path_factory.mktemp("digits")), n_train=256, n_val=32, n_test=64,
                             digits=(0, 1, 2, 3))


def _test_accuracy(files, out, **train):
    from mmkernels.train.cli import train_main
    settings = {"epochs": 4, "lr": 3e-3, "final_eval": True, **train}
    assert train_main(jsonl_overrides(files, out, **settings)) == 0
    return json.load(open(os.path.join(out, "report.json")))["test"]


def test_a_tiny_run_learns_an_easy_task(files, tmp_path):
    rep = _test_accuracy(files, str(tmp_path / "run"))
    assert rep["n"] == 64 and rep["accuracy"] >= 0.9, rep
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert max(steps) == 64


def test_without_updates_the_same_run_stays_near_chance(files, tmp_path):
    rep = _test_accuracy(files, str(tmp_path / "run"), lr=1e-12)  # steps of ~1e-12: the initial weights
    assert rep["accuracy"] <= 0.5, rep
