"""Training-step time of the fusion model on the mmkernels ops vs the same model on the reference ops
(same weights, same batch, same run, interleaved; medians).

    python benchmarks/bench_train_step.py [--batch-size 64] [--steps 20] [--config configs/quick.yaml] [--device cpu]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmkernels.models import FusionModel  # noqa: E402
from mmkernels.models.text import load_tokenizer  # noqa: E402
from mmkernels.train.config import load_config  # noqa: E402
from mmkernels.train.optim import make_optimizer  # noqa: E402


def synthetic_batch(B: int, text_len: int = 24, audio_len: int = 8000, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = load_tokenizer()
    qs = ["What is the sum of the spoken and the written digits?", "Which digit is spoken?",
          "Is the number you hear bigger than the number in the image?"]
    enc = tok([qs[i % 3] for i in range(B)], padding="max_length", max_length=text_len, truncation=True,
              return_tensors="pt")
    L = torch.randint(audio_len // 4, audio_len + 1, (B,), generator=g)   # padded audio, like the data set
    audio = ((torch.rand(B, audio_len, generator=g) * 2 - 1) * (torch.arange(audio_len)[None] < L[:, None]) * 32000).short()
    b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
         "image": torch.randint(0, 256, (B, 28, 28), generator=g, dtype=torch.uint8),
         "audio": audio, "audio_lengths": L, "labels": torch.randint(0, 21, (B,), generator=g),
         "heard": torch.randint(0, 10, (B,), generator=g), "written": torch.randint(0, 10, (B,), generator=g)}
    return {k: v.to(device) for k, v in b.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "quick.yaml"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=15, help="timed steps per backend (interleaved)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("overrides", nargs="*", help="model.key=value overrides")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    cfg.model.dropout = 0.0
    torch.manual_seed(0)
    # One model and one optimizer (the trainer's: its groups, fused AdamW), its ops switched to a backend
    # before each step: the two backends share the weights in memory, so only the ops differ between them
    # (as in bench_transformers.py, where copies of a model made their identical parts differ).
    base = FusionModel(cfg.model).to(a.device)
    backends = {"mmkernels": None, "reference": "reference"}
    opt = make_optimizer(base, cfg.train)
    # as the trainer feeds it: prepare_batch adds the rows' text keys, so a frozen text encoder runs once per
    # distinct question (its cache), not every step
    batch = base.prepare_batch(synthetic_batch(a.batch_size, cfg.data.max_text_len,
                                               int(cfg.data.max_audio_seconds * 8000)), a.device)

    def step(name):
        base.set_backend(backends[name])
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if a.bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = base(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if a.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(a.warmup):
        for n in backends:
            step(n)
    times = {n: [] for n in backends}
    for _ in range(a.steps):
        for n in backends:
            times[n].append(step(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    rows = [{"backend": n, "median_ms": round(1e3 * med[n], 2), "min_ms": round(1e3 * min(times[n]), 2),
             "samples_per_s": round(a.batch_size / med[n], 1), "speedup_vs_reference": round(med["reference"] / med[n], 3)}
            for n in backends]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "train_step.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
    meta = {"device": a.device, "batch_size": a.batch_size, "steps": a.steps, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "config": a.config, "rows": rows}
    with open(os.path.join(a.out, "train_step.json"), "w") as f:
        json.dump(meta, f, indent=1)
    md = ["| backend | median step (ms) | min (ms) | samples/s | speed-up vs reference |", "|---|---|---|---|---|"]
    md += [f"| {r['backend']} | {r['median_ms']} | {r['min_ms']} | {r['samples_per_s']} | {r['speedup_vs_reference']}x |" for r in rows]
    with open(os.path.join(a.out, "train_step.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.boxplot([[1e3 * t for t in times[n]] for n in backends])
        ax.set_xticks(range(1, len(backends) + 1), list(backends))
        ax.set_ylabel("training step (ms)")
        ax.set_title(f"fusion model step, batch {a.batch_size}, {a.device}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "train_step.png"), dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print(f"device={a.device} batch={a.batch_size} steps={a.steps} threads={torch.get_num_threads()}")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
