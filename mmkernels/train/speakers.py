"""Leave-one-speaker-out over recorded speech (mmkernels-speakers): one training run per speaker of
`data.speech_dir`, with that speaker's recordings as the test split (`data.test_speaker`) and the others
training; then each fold's accuracy (overall, on "heard" questions, per question type) and their mean.

A fold whose run folder holds its report is kept, an unfinished one resumes from its checkpoint, so an
interrupted run loses nothing: run the same command again."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

REPORT_NAME = "speakers_report.json"
PLOT_NAME = "speakers.png"


def fold_summary(report: Dict) -> Dict:
    """The figures of one fold's report.json: test accuracy, per type, and the training time."""
    test = report["test"]
    return {"accuracy": test["accuracy"], "heard": test["per_type"].get("heard"),
            "per_type": test["per_type"], "heldout_phrasings": report.get("test_heldout_phrasings", {}).get("accuracy"),
            "train_seconds": report.get("train", {}).get("train_seconds")}


def summarize(folds: Dict[str, Dict]) -> Dict:
    """Per-fold figures plus the mean and spread (population std) of accuracy and heard accuracy."""
    out = {"folds": folds}
    for key in ("accuracy", "heard"):
        vals = [f[key] for f in folds.values() if f.get(key) is not None]
        if vals:
            out[f"mean_{key}"] = statistics.fmean(vals)
            out[f"std_{key}"] = statistics.pstdev(vals)
            out[f"min_{key}"] = min(vals)
    return out


def format_summary(summary: Dict) -> str:
    lines = [f"{'test speaker':<14} {'acc':>6} {'heard':>6} {'held-out':>8} {'minutes':>7}", "-" * 45]
    for spk, f in summary["folds"].items():
        ho = f.get("heldout_phrasings")
        mins = f.get("train_seconds")
        lines.append(f"{spk:<14} {100 * f['accuracy']:6.2f} {100 * (f['heard'] or 0):6.2f} "
                     f"{'' if ho is None else f'{100 * ho:8.2f}':>8} {'' if mins is None else f'{mins / 60:7.1f}':>7}")
    if "mean_accuracy" in summary:
        lines.append(f"{'mean':<14} {100 * summary['mean_accuracy']:6.2f} {100 * summary.get('mean_heard', 0):6.2f}")
        lines.append(f"{'spread (std)':<14} {100 * summary['std_accuracy']:6.2f} {100 * summary.get('std_heard', 0):6.2f}")
    return "\n".join(lines)


def plot_summary(summary: Dict, path: str) -> Optional[str]:
    """Bar chart of each fold's overall and heard accuracy, with the 90% line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from mmkernels.utils.atomic import atomic_write

    names = list(summary["folds"])
    acc = [100 * summary["folds"][s]["accuracy"] for s in names]
    heard = [100 * (summary["folds"][s]["heard"] or 0) for s in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.2))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], acc, 0.4, label="all questions")
    ax.bar([i + 0.2 for i in x], heard, 0.4, label='"heard" questions')
    ax.axhline(90, color="gray", lw=0.8, ls="--")
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("test accuracy on the unseen speaker (%)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def _fold_done(fold_dir: str) -> Optional[Dict]:
    from mmkernels.train.trainer import RUN_REPORT_NAME

    p = os.path.join(fold_dir, RUN_REPORT_NAME)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def run_folds(config_path: Optional[str], overrides: List[str], speakers: Optional[List[str]] = None) -> Dict:
    """Train (or resume, or reuse) every fold; returns the summary, also written to the output folder. The
    summary covers every finished fold in the folder, so two runs side by side over disjoint --speakers
    (one thread each) leave one report of all the folds when the second finishes."""
    from mmkernels.data.speech import scan_fsdd
    from mmkernels.train.config import ConfigError, load_config
    from mmkernels.train.checkpoint import CKPT_NAME
    from mmkernels.train.trainer import Trainer
    from mmkernels.utils.atomic import write_json

    base = load_config(config_path, overrides)
    if not base.data.speech_dir:
        raise ConfigError("leave-one-speaker-out needs recorded speech: set data.speech_dir")
    if not os.path.isdir(base.data.speech_dir):
        raise ConfigError(f"data.speech_dir: {base.data.speech_dir} is not a folder (recordings named "
                          "{digit}_{speaker}_{take}.wav, as the Free Spoken Digit Dataset's; set data.speech_dir=PATH)")
    found = sorted(scan_fsdd(base.data.speech_dir))
    if len(found) < 2:
        raise ConfigError(f"leave-one-speaker-out needs at least 2 speakers in {base.data.speech_dir}, found {found}")
    speakers = speakers or found
    unknown = [s for s in speakers if s not in found]
    if unknown:
        raise ConfigError(f"--speakers: no recordings of {', '.join(unknown)} in {base.data.speech_dir} "
                          f"(speakers: {', '.join(found)})")
    out_dir = base.train.output_dir
    folds = {}
    for spk in speakers:
        fold_dir = os.path.join(out_dir, spk)
        report = _fold_done(fold_dir)
        if report is None:
            cfg = load_config(config_path, overrides + [f"data.test_speaker={spk}", f"train.output_dir={fold_dir}",
                                                        "train.final_eval=true"])  # a fold needs its report
            resume = fold_dir if os.path.exists(os.path.join(fold_dir, CKPT_NAME)) else None
            print(f"== fold: test speaker {spk} ({'resumed' if resume else 'new'}) -> {fold_dir}", flush=True)
            Trainer(cfg, resume=resume).train()
            report = _fold_done(fold_dir)
        else:
            print(f"== fold: test speaker {spk}: kept ({fold_dir}/report.json)", flush=True)
        folds[spk] = fold_summary(report)
    # folds another process finished in the same folder (two runs side by side, each given --speakers)
    for spk in found:
        report = None if spk in folds else _fold_done(os.path.join(out_dir, spk))
        if report is not None:
            print(f"== fold: test speaker {spk}: finished earlier or by another run, in the summary", flush=True)
            folds[spk] = fold_summary(report)
    folds = {spk: folds[spk] for spk in found if spk in folds}
    summary = summarize(folds)
    summary["config"] = config_path
    summary["overrides"] = overrides
    os.makedirs(out_dir, exist_ok=True)
    plot = plot_summary(summary, os.path.join(out_dir, PLOT_NAME))
    if plot:
        summary["plot"] = plot
    summary["report"] = os.path.join(out_dir, REPORT_NAME)
    write_json(summary["report"], summary)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    from mmkernels.data.avmnist import DataFormatError
    from mmkernels.data.speech import MissingPackageError
    from mmkernels.train.checkpoint import CheckpointError
    from mmkernels.train.cli import _Parser, _fail
    from mmkernels.train.config import ConfigError

    p = _Parser(prog="mmkernels-speakers",
                description="Leave-one-speaker-out over recorded speech: one run per speaker of data.speech_dir "
                            "with that speaker as the test split, then each fold's accuracy and the mean. Finished "
                            "folds are kept and unfinished ones resume: rerun the same command after an interruption.",
                epilog="overrides: section.key=value, e.g. train.epochs=3 data.speech_dir=/path/to/fsdd")
    p.add_argument("--config", "-c", default="configs/speakers.yaml", help="YAML config (default configs/speakers.yaml)")
    p.add_argument("--speakers", help="comma-separated test speakers (default: every speaker of data.speech_dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    a = p.parse_args(argv)
    speakers = [s.strip() for s in a.speakers.split(",") if s.strip()] if a.speakers else None
    try:
        summary = run_folds(a.config, list(a.overrides), speakers)
    except (ConfigError, CheckpointError, DataFormatError, MissingPackageError, FileNotFoundError, ValueError) as e:
        return _fail(str(e))  # ValueError: a folder with no recordings in it (scan_fsdd)
    print(format_summary(summary))
    print(json.dumps({k: v for k, v in summary.items() if k == "report" or k.startswith(("mean_", "std_", "min_"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
