"""Command-line entry points: mmkernels-train, mmkernels-eval, mmkernels-predict (eval and predict import
nothing of the training loop)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

EPILOG = "overrides: section.key=value, e.g. train.epochs=3 model.d_model=128 data.speech_dir=/path/to/fsdd"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit code 2, like every other user error."""

    def error(self, message):
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(msg: str) -> int:
    """One `error:` line on stderr (from the first process only, under torchrun), exit code 2."""
    from mmkernels.train.distributed import is_main

    if is_main():
        print("error: " + " ".join(str(msg).split()), file=sys.stderr)
    return 2


def train_main(argv: Optional[List[str]] = None) -> int:
    from mmkernels.data.avmnist import DataFormatError
    from mmkernels.data.speech import MissingPackageError
    from mmkernels.train.config import ConfigError, load_config
    from mmkernels.train.checkpoint import CheckpointError
    from mmkernels.train.distributed import cleanup_distributed
    from mmkernels.train.trainer import Trainer

    p = _Parser(prog="mmkernels-train", description="Train the text+image+audio fusion model.", epilog=EPILOG)
    p.add_argument("--config", "-c", help="YAML config (configs/quick.yaml, configs/full.yaml, ...)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint file or run folder (default: the run's own checkpoint)")
    p.add_argument("--output-dir", help="same as train.output_dir=...")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, with the overrides applied) as YAML and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value (see --print-config for the keys)")
    a = p.parse_args(argv)
    try:
        ov = list(a.overrides) + ([f"train.output_dir={a.output_dir}"] if a.output_dir else [])
        cfg = load_config(a.config, ov)
        if a.print_config:
            from mmkernels.train.config import yaml_dump

            print(yaml_dump(json.loads(json.dumps(cfg.to_dict(), default=str))), end="")
            return 0
        resume = a.resume
        if resume == "auto":
            resume = cfg.train.output_dir
        trainer = Trainer(cfg, resume=resume)
        res = trainer.train()
        if trainer.main:
            print(json.dumps({k: v for k, v in res.items() if k != "report"}), flush=True)
    except (ConfigError, CheckpointError, DataFormatError, MissingPackageError, FileNotFoundError) as e:
        return _fail(str(e))
    finally:
        cleanup_distributed()
    return 0


def eval_main(argv: Optional[List[str]] = None) -> int:
    from mmkernels.data.avmnist import DataFormatError
    from mmkernels.models.fusion_model import FusionModel
    from mmkernels.models.text import saved_tokenizer
    from mmkernels.train.config import ConfigError, load_config
    from mmkernels.train.data import prepare_data_dir
    from mmkernels.train.evaluation import check_labels_fit, evaluation_report, format_report

    p = _Parser(prog="mmkernels-eval", description="Evaluation report of a saved model: accuracy "
                "overall and per question type, held-out phrasings, each modality removed.", epilog=EPILOG)
    p.add_argument("--model", "-m", required=True, help="folder written by save_pretrained (e.g. runs/quick/best)")
    p.add_argument("--config", "-c", help="data config; default: the run_config.json next to the model")
    p.add_argument("--data-dir", help="built data folder ({split}.pt)")
    p.add_argument("--backend", default="keep", help="kernel backend: default | reference | cpu | cuda | triton")
    p.add_argument("--output", "-o", help="write the report as JSON here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        backend = {"keep": "keep", "default": None}.get(a.backend, a.backend)
        model = FusionModel.from_pretrained(a.model, kernel_backend=backend)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.to(device)
        base = None
        rc = os.path.join(os.path.dirname(os.path.abspath(a.model)), "run_config.json")
        if not a.config and os.path.exists(rc):
            with open(rc) as f:
                base = {k: v for k, v in json.load(f).items() if k == "data"}
        cfg = load_config(a.config, list(a.overrides) + ([f"data.data_dir={a.data_dir}"] if a.data_dir else []), base=base)
        check_labels_fit(model.config, cfg.data.dataset)  # before any data is built
        data_dir = prepare_data_dir(cfg)
        rep = evaluation_report(model, data_dir, cfg.data.max_text_len, a.batch_size, device,
                                torch.bfloat16 if device == "cuda" else None, progress=True, cfg=cfg,
                                tokenizer=saved_tokenizer(a.model, model.config.text_model_path))
    except (ConfigError, DataFormatError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    print(format_report(rep))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


def predict_main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog="mmkernels-predict",
                description="Answer questions about an image + a spoken WAV; JSON lines out, in input order.")
    p.add_argument("--model", "-m", required=True,
                   help="folder written by save_pretrained, or by --export (a torch.export program)")
    p.add_argument("--image", help="image file (PNG/JPEG...) of a digit")
    p.add_argument("--audio", help="WAV file of a spoken digit (any sample rate: resampled to the model's)")
    p.add_argument("--question", "-q", help="question text")
    p.add_argument("--input", "-i", help="JSON lines file with fields image, audio, question (one query a line)")
    p.add_argument("--output", "-o", help="output JSON lines file (default: stdout)")
    p.add_argument("--backend", default="keep")
    p.add_argument("--max-audio-seconds", type=float, default=None,
                   help="audio kept per query (default: the model's training setting, else 1.0)")
    p.add_argument("--max-text-len", type=int, default=None,
                   help="question tokens (default: the model's training setting, else 24)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64,
                   help="queries read and answered together (default 64); the model runs on blocks of 64 rows "
                        "whatever it is, so an answer does not depend on the batch")
    p.add_argument("--workers", type=int, default=1,
                   help="processes reading the image and audio files (default 1; 0: in this process)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the model's forward (default: the CPU cores less one, kept for reading, at "
                        "least 1); answers do not depend on --batch-size or --workers, their last digits may on this")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal for long inputs)")
    p.add_argument("--export", metavar="DIR",
                   help="write the model as a torch.export program to the folder DIR (model.pt2, its config, "
                        "preprocessing and tokenizer; --model DIR then serves it) and exit")
    a = p.parse_args(argv)
    for name, v, low in (("--batch-size", a.batch_size, 1), ("--workers", a.workers, 0), ("--top-k", a.top_k, 1),
                         ("--max-text-len", a.max_text_len, 1), ("--max-audio-seconds", a.max_audio_seconds, 0),
                         ("--threads", a.threads, 1)):
        if v is not None and not (v > low if isinstance(v, float) else v >= low):
            return _fail(f"{name} must be {'>' if isinstance(v, float) else '>='} {low}, got {v}")
    threads = torch.get_num_threads()
    # one core is left to the reading (and to the rest of the machine): a thread of the forward that shares
    # its core makes every parallel op wait for it. Not from --workers: answers must not depend on it.
    torch.set_num_threads(a.threads or max(1, _cores() - 1))
    try:
        return _predict(a)
    finally:
        torch.set_num_threads(threads)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _predict(a) -> int:
    from mmkernels.train.inference import Predictor, read_queries

    try:
        if a.export:
            return _export(a)
        if a.input:
            queries, where = read_queries(a.input), a.input
            base = os.path.dirname(os.path.abspath(a.input))  # relative paths: from the queries file, as in training
        elif a.image or a.audio or a.question:
            queries = [(1, {k: v for k, v in (("image", a.image), ("audio", a.audio), ("question", a.question))
                            if v})]
            where, base = None, os.getcwd()
        else:
            return _fail("give --image, --audio and --question (those the model uses), or --input queries.jsonl")
        pred = Predictor(a.model, {"keep": "keep", "default": None}.get(a.backend, a.backend), a.max_text_len,
                         a.max_audio_seconds)
        progress = not a.no_progress and sys.stderr.isatty() and len(queries) > a.batch_size
        answers = pred.predict(queries, where, base, a.batch_size, a.workers, a.top_k, progress)
        if a.output:  # streamed to a temporary file, renamed over the output once every query is answered
            from mmkernels.utils.atomic import atomic_write

            def write(f):
                for r in answers:
                    f.write(json.dumps(r) + "\n")

            try:
                atomic_write(a.output, write, mode="w")
            except IsADirectoryError as e:
                raise ValueError(f"--output {a.output} is a folder") from e
            except OSError as e:  # a parent that is a file, no permission, a full disk...
                raise ValueError(f"--output {a.output} cannot be written: {e.strerror or e}") from e
        else:
            lines = "".join(json.dumps(r) + "\n" for r in answers)  # written once all queries succeeded
            sys.stdout.write(lines)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _fail(str(e))
    return 0


def _export(a) -> int:
    """mmkernels-predict --model DIR --export OUT: the saved model as a torch.export program folder."""
    from mmkernels.models.export import mmkernels_ops, save_exported
    from mmkernels.train.inference import Predictor

    if a.input or a.image or a.audio or a.question:
        return _fail("--export writes the exported model and answers no queries: give it without --input, "
                     "--image, --audio and --question")
    pred = Predictor(a.model, {"keep": "keep", "default": None}.get(a.backend, a.backend), a.max_text_len,
                     a.max_audio_seconds)
    if pred.exported:
        return _fail(f"{a.model} is already an exported program")
    prep = dict(pred.saved_preprocessing, max_text_len=pred.prep.max_text_len,
                max_audio_seconds=pred.prep.max_audio_len / pred.prep.sample_rate, sample_rate=pred.prep.sample_rate)
    try:
        program = save_exported(pred.model, a.export, prep, pred.tokenizer)
    except OSError as e:
        return _fail(f"--export {a.export} cannot be written: {e.strerror or e}")
    print(json.dumps({"exported": os.path.abspath(a.export), "mmkernels_ops": mmkernels_ops(program)}))
    return 0
