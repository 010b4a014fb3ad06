"""Host syncs: a training step reads nothing back from the device (on a GPU each read is a sync); the
running loss / accuracy stay on the device and are read once per logging interval."""
import pytest

pytest.importorskip("mnist")
pytest.importorskip("transformers")

from train_fixtures import count_host_reads, jsonl_overrides, write_digit_jsonl  # noqa: E402

# evaluation and checkpoints read back by design (once per evaluation / checkpoint, not per step);
# prepare_batch reads the cache keys of a frozen text encoder from the batch before it is moved
NOT_A_STEP = {"_validate", "save_checkpoint", "save_model", "prepare_batch"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_digit_jsonl(str(tmp_path_factory.mktemp("digits")), n_train=32, n_val=16, n_test=16)


@pytest.mark.parametrize("finetune", ["all", "frozen"])
def test_a_training_step_reads_nothing_back(files, tmp_path, finetune):
    from mmkernels.train.config import load_config
    from mmkernels.train.trainer import Trainer
    tr = Trainer(load_config(None, jsonl_overrides(files, str(tmp_path / "run")) + [f"model.text_finetune={finetune}"]))
    batch = tr.model.prepare_batch(tr.train_ds.__getitems__(list(range(16))), tr.device)
    for _ in range(3):
        with count_host_reads() as reads:
            tr._train_step(tr.model, batch)
        assert reads == []


@pytest.mark.parametrize("finetune", ["all", "frozen"])
def test_a_log_interval_reads_back_once(files, tmp_path, finetune):
    from mmkernels.train.config import load_config
    from mmkernels.train.trainer import Trainer
    # 2 epochs of 2 steps, a log row every 2 steps, checkpoints and evaluations at the epoch ends only
    tr = Trainer(load_config(None, jsonl_overrides(files, str(tmp_path / "run"), log_every=2, ckpt_every=0)
                             + [f"model.text_finetune={finetune}"]))
    with count_host_reads() as reads:
        tr.train()
    in_steps = [r for r in reads if not NOT_A_STEP & r.stack]
    assert len(in_steps) == 2, in_steps  # steps 2 and 4
    assert len({r.where for r in in_steps}) == 1


def test_a_checkpoint_reads_the_running_metrics_on_the_first_process_only(files, tmp_path):
    """The running metrics of the log interval are a top-level checkpoint entry, read back from the
    device by the process that writes the checkpoint only, and put back on resume."""
    import torch
    from mmkernels.train.checkpoint import load_checkpoint
    from mmkernels.train.config import load_config
    from mmkernels.train.trainer import Trainer
    out = str(tmp_path / "run")
    # 2 steps an epoch, no log row (log_every=3) before the epoch-end checkpoint: metrics of 2 steps pending
    cfg = load_config(None, jsonl_overrides(files, out, epochs=1, log_every=3, ckpt_every=0))
    tr = Trainer(cfg)
    tr.train()
    ck = load_checkpoint(tr.checkpoint_path())
    assert "run_metrics" not in ck["state"]
    loss_sum, rows, hits, scored = ck["run_metrics"]
    assert rows == scored == 32 and loss_sum > 0 and 0 <= hits <= 32
    resumed = Trainer(load_config(None, jsonl_overrides(files, out, epochs=1, log_every=3, ckpt_every=0)),
                      resume=out)
    assert resumed._run.tolist() == ck["run_metrics"] and "run_metrics" not in resumed.state
    resumed.main = False  # as on another process: it takes part in the RNG gather, writes nothing
    with count_host_reads() as reads:
        resumed.save_checkpoint()
    assert reads == []
    assert torch.equal(load_checkpoint(tr.checkpoint_path())["model"]["head.1.weight"], ck["model"]["head.1.weight"])


def test_count_host_reads_watches_the_forward_path_but_not_the_cpu_only_checks():
    """Reads made by code in mmkernels/train, models, nn and ops are counted; the ops' argument checks
    (mmkernels/ops/_checks.py: values read on the CPU only, by design) and code elsewhere are not."""
    import os

    import torch

    import mmkernels
    pkg = os.path.dirname(os.path.abspath(mmkernels.__file__))
    t = torch.ones(2)

    def read_from(*parts):  # a read whose caller's file is pkg/parts (compiled under that name)
        with count_host_reads() as reads:
            exec(compile("t.sum().item(); t.tolist()", os.path.join(pkg, *parts), "exec"), {"t": t})
        return [r.method for r in reads]

    for parts in (("train", "trainer.py"), ("models", "fusion_model.py"), ("nn", "attention.py"),
                  ("nn", "fusion.py"), ("ops", "gated_fusion.py")):
        assert read_from(*parts) == ["item", "tolist"], parts
    assert read_from("ops", "_checks.py") == []
    assert read_from("reference.py") == []
    with count_host_reads() as reads:
        t.sum().item()  # this test file
    assert reads == []
