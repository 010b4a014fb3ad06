"""Evaluation of a model: loss, accuracy, macro-F1 (entity F1 for tagging) and accuracy per question type
on a split; the report of mmkernels-eval and of a run's end (test, held-out phrasings, each modality
removed); its table. Imports nothing of the training loop."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Dict, Optional, Sequence

import torch

from mmkernels.data.avmnist import ANSWERS, AVMNISTQA
from mmkernels.models.fusion_model import FusionModel
from mmkernels.train import metrics as M
from mmkernels.train.config import Config
from mmkernels.train.data import jsonl_dataset, load_dataset, model_tokenizer


@torch.no_grad()
def evaluate(model: FusionModel, ds: AVMNISTQA, batch_size: int = 256, drop: Sequence[str] = (),
             device="cpu", amp_dtype=None, progress: bool = False, desc: str = "eval", detail: bool = False) -> Dict:
    """Loss, accuracy, macro-F1 (tagging: per scored word, plus entity F1) and accuracy per question type;
    with `detail`, the per-class report (`per_class`; tagging: the per-entity-type one, `per_entity`)."""
    from tqdm.auto import tqdm
    was = model.training
    model.eval()
    preds, golds, qts, losses = [], [], [], []
    tagging = model.config.task == "token_classification"
    n = len(ds)
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        b = model.prepare_batch(ds.__getitems__(list(range(i, min(n, i + batch_size)))), device)
        ctx = torch.autocast(device_type="cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with ctx:
            out = model(b, drop=drop)
        losses.append(out["loss"].detach().float() * len(b["labels"]))  # read back once, after the loop
        preds.append(out["logits"].argmax(-1))
        golds.append(b["labels"])
        qts.append(b["qtype"])
    model.train(was)
    p, g, q = (torch.cat(x).cpu().numpy() for x in (preds, golds, qts))
    losses = float(torch.stack(losses).sum()) if losses else 0.0
    names = model.config.labels or [str(i) for i in range(model.config.num_labels)]
    if tagging:  # per token, on the words' first sub-tokens (the rest are -100), plus entity-level F1
        keep = g != -100
        pred_tags = [[names[t] for t in pr[k]] for pr, k in zip(p, keep)]
        gold_tags = [[names[t] for t in go[k]] for go, k in zip(g, keep)]
        r = {"loss": losses / max(1, n), "accuracy": M.accuracy(p[keep], g[keep]),
             "macro_f1": M.macro_f1(p[keep], g[keep]), "entity_f1": M.entity_f1(pred_tags, gold_tags)["f1"],
             "n": int(n), "per_type": {}}
        if detail:
            r["per_entity"] = M.entity_report(pred_tags, gold_tags)
        return r
    types = getattr(ds, "question_types", None)
    r = {"loss": losses / max(1, n), "accuracy": M.accuracy(p, g), "macro_f1": M.macro_f1(p, g), "n": int(n),
         "per_type": M.grouped_accuracy(p, g, q, types) if types else {}}
    if detail:
        r["per_class"] = M.class_report(p, g, names)
    return r


def check_labels_fit(model_config, dataset: str) -> None:
    """A model trained on its own labels cannot be scored on the AV-MNIST answers (and back)."""
    own = model_config.labels is not None and list(model_config.labels) != list(ANSWERS)
    if dataset == "avmnist" and own:
        raise ValueError(f"this model's labels {list(model_config.labels)[:5]} are not the AV-MNIST answers: "
                         "evaluate it on its own data (a config with data.dataset=jsonl and data.test_file)")


def evaluation_report(model: FusionModel, data_dir: Optional[str], max_text_len: int, batch_size: int = 256,
                      device="cpu", amp_dtype=None, progress: bool = False, cfg: Optional[Config] = None,
                      tokenizer=None) -> Dict:
    """Accuracy overall and per question type on test, on the held-out phrasings, and on test with
    each modality removed in turn (data.dataset=jsonl: its test file, given through cfg)."""
    rep = {}
    tok = tokenizer or model_tokenizer(model.config)
    heldout = None
    if data_dir is None:
        if cfg is None or cfg.data.dataset != "jsonl":
            raise ValueError("evaluation_report: no data folder and no data.dataset=jsonl config")
        test = jsonl_dataset(cfg, model.config, "test", tok)
    else:
        check_labels_fit(model.config, "avmnist")
        test = load_dataset(data_dir, "test", max_text_len, tok)
        if os.path.exists(os.path.join(data_dir, "test_heldout.pt")):
            heldout = load_dataset(data_dir, "test_heldout", max_text_len, tok)
    rep["test"] = evaluate(model, test, batch_size, (), device, amp_dtype, progress, "test", detail=True)
    if heldout is not None:
        rep["test_heldout_phrasings"] = evaluate(model, heldout, batch_size, (), device, amp_dtype, progress,
                                                 "held-out")
    if len(model.modalities) > 1:
        for m in model.modalities:
            rep[f"test_without_{m}"] = evaluate(model, test, batch_size, (m,), device, amp_dtype, progress, f"-{m}")
    return rep


def format_report(rep: Dict) -> str:
    """One line per split: accuracy, macro-F1, entity F1 (tagging) and accuracy per question type; then
    the test split's per-class (tagging: per-entity-type) precision, recall, F1 and support."""
    cols = list(dict.fromkeys(c for r in rep.values() for c in r.get("per_type", {})))
    ent = any("entity_f1" in r for r in rep.values())
    head = f"{'split':<26} {'acc':>6} {'mF1':>6} " + (f"{'entF1':>6} " if ent else "")
    lines = [head + " ".join(f"{c:>7}" for c in cols), "-" * (len(head) + 8 * len(cols))]
    for k, r in rep.items():
        lines.append(f"{k:<26} {100 * r['accuracy']:6.2f} {100 * r['macro_f1']:6.2f} "
                     + (f"{100 * r.get('entity_f1', float('nan')):6.2f} " if ent else "")
                     + " ".join(f"{100 * r['per_type'].get(c, float('nan')):7.2f}" for c in cols))
    test = rep.get("test", {})
    for key, title, first in (("per_class", "per class", "class"), ("per_entity", "per entity type", "type")):
        rows = test.get(key)
        if not rows:
            continue
        w = max(12, *(len(str(k)) for k in rows))
        lines += ["", f"test, {title}", f"{first:<{w}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        lines += [f"{k:<{w}} {100 * v['precision']:9.2f} {100 * v['recall']:9.2f} {100 * v['f1']:9.2f} "
                  f"{v['support']:8d}" for k, v in rows.items()]
    return "\n".join(lines)
