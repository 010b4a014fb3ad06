"""The deployment path: a FusionModel as a `torch.export` program (.pt2) that keeps the mmkernels ops as
custom ops (torch.ops.mmkernels.cross_modal_attention_fwd / gated_fusion_fwd, traced through their fake
kernels), batch size dynamic; an exported folder holds the program with what a server needs to prepare
inputs as in training (config, preprocessing, tokenizer) and runs without the model's Python code.

    from mmkernels.models.export import save_exported, load_exported
    save_exported(model, "runs/quick/exported", preprocessing, tokenizer)   # mmkernels-predict --export DIR
    program = load_exported("runs/quick/exported")                            # a torch.nn.Module
    logits = program(input_ids, attention_mask, image, audio, audio_lengths)
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn as nn

PROGRAM_NAME = "model.pt2"
INPUTS = ("input_ids", "attention_mask", "image", "audio", "audio_lengths")


class LogitsOf(nn.Module):
    """model(batch)["logits"] with the batch as positional tensors (INPUTS), as torch.export takes them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, image, audio, audio_lengths):
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask, "image": image,
                           "audio": audio, "audio_lengths": audio_lengths})["logits"]


def example_batch(model, max_text_len: int = 24, max_audio_len: int = 8000, batch_size: int = 2) -> Dict:
    """A batch of the model's input shapes and dtypes (two rows of other text and audio lengths)."""
    g = torch.Generator().manual_seed(0)
    vocab = model.text.config.vocab_size if hasattr(model, "text") else 2
    am = torch.ones(batch_size, max_text_len, dtype=torch.long)
    am[1:, max(1, max_text_len // 2):] = 0
    return {"input_ids": torch.randint(0, vocab, (batch_size, max_text_len), generator=g) * am,
            "attention_mask": am,
            "image": torch.randint(0, 256, (batch_size, 28, 28), dtype=torch.uint8, generator=g),
            "audio": torch.rand(batch_size, max_audio_len, generator=g) * 2 - 1,
            "audio_lengths": torch.tensor([max_audio_len] + [max(1, max_audio_len // 2)] * (batch_size - 1))}


def export_model(model: nn.Module, batch: Dict) -> torch.export.ExportedProgram:
    """torch.export of model(batch)["logits"] in eval mode, the batch dimension dynamic (1 and up)."""
    was = model.training
    model.eval()
    try:
        b = torch.export.Dim("batch", min=1, max=1 << 20)
        args = tuple(batch[k] for k in INPUTS)
        with torch.no_grad():
            return torch.export.export(LogitsOf(model), args, dynamic_shapes=tuple({0: b} for _ in INPUTS))
    finally:
        model.train(was)


def mmkernels_ops(program: torch.export.ExportedProgram) -> List[str]:
    """The mmkernels custom ops the program calls (e.g. ['mmkernels.cross_modal_attention_fwd', ...])."""
    return sorted({str(n.target).rsplit(".", 1)[0] for n in program.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("mmkernels.")})


def save_program(program: torch.export.ExportedProgram, path: str) -> None:
    with warnings.catch_warnings():  # a weight shared by two modules is stored once, as it should
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, path)


def save_exported(model, path: str, preprocessing: Optional[dict] = None, tokenizer=None,
                  batch: Optional[Dict] = None) -> torch.export.ExportedProgram:
    """Export `model` and write the folder `path`: PROGRAM_NAME, the model's config.json (labels, modalities,
    task), preprocessing.json and the tokenizer. Written in a temporary folder, fsynced and swapped in
    whole, like save_pretrained. Returns the program."""
    from mmkernels.models.config import CONFIG_NAME, PREPROCESSING_NAME, saved_config, write_plain_json
    from mmkernels.utils.atomic import new_dir

    prep = preprocessing or {}
    if batch is None:
        batch = example_batch(model, int(prep.get("max_text_len", 24)),
                              int(float(prep.get("max_audio_seconds", 1.0)) * int(prep.get("sample_rate", 8000))))
    program = export_model(model, batch)
    with new_dir(path) as tmp:
        save_program(program, os.path.join(tmp, PROGRAM_NAME))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_plain_json(os.path.join(tmp, CONFIG_NAME), saved_config(model))
        write_plain_json(os.path.join(tmp, PREPROCESSING_NAME), prep)
    return program


def is_exported(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PROGRAM_NAME))


def load_exported(path: str) -> nn.Module:
    """The program of an exported folder (or a .pt2 file) as a module: module(*INPUTS) -> logits."""
    import mmkernels.ops  # noqa: F401  (the custom ops the program calls)

    f = os.path.join(path, PROGRAM_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"not an exported mmkernels model: {f} is missing")
    import logging
    log = logging.getLogger("torch.export")  # it logs a failed load at length before raising
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(f).module()
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"corrupt exported program {f}: {type(e).__name__}: {first}") from e
    finally:
        log.setLevel(level)
