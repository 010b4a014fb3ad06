"""Answers of a saved model to queries (mmkernels-predict), in batches: the queries file read with its line
numbers, the image and audio files read by a torch DataLoader (worker processes), the questions tokenized a
batch at a time, one forward per batch, the answers in input order. The model is a save_pretrained folder
(eager, on the mmkernels ops) or an exported folder (mmkernels/models/export.py: the torch.export program).
Every query is prepared exactly as in training and alone: a row's answer does not depend on the batch.
Imports nothing of the training loop."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

# rows of every model forward (see Predictor.logits)
FORWARD_ROWS = 64
# the fields each modality reads ("text": the field name of the training JSON lines)
FIELDS = {"image": ("image",), "audio": ("audio",), "text": ("question", "text")}


class QueryError(ValueError):
    """A query that cannot be answered; the message names the queries file and line."""


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def read_queries(path: str) -> List[Tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line of a UTF-8 JSON lines file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"queries file not found: {path}") from e
    except OSError as e:
        raise QueryError(f"cannot read queries file {path}: {e.strerror or e}") from e
    out = []
    with f:
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if ln == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise QueryError(f"{path}:{ln}: not UTF-8 text ({e.reason} at byte {e.start})") from e
            if line.strip():
                try:
                    out.append((ln, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise QueryError(f"{path}:{ln}: not valid JSON: {e}") from e
    return out


@dataclass
class Preprocessing:
    """How a query becomes the model's inputs: as in training (the saved preprocessing.json)."""
    modalities: Sequence[str]
    max_text_len: int = 24
    max_audio_len: int = 8000
    sample_rate: int = 8000

    @classmethod
    def of_saved(cls, saved: dict, modalities, max_text_len=None, max_audio_seconds=None) -> "Preprocessing":
        rate = int(saved.get("sample_rate", 8000))
        seconds = max_audio_seconds or float(saved.get("max_audio_seconds", 1.0))
        return cls(list(modalities), int(max_text_len or saved.get("max_text_len", 24)), int(seconds * rate), rate)


class QueryDataset(torch.utils.data.Dataset):
    """Query i -> image (uint8 28x28), audio (float, max_audio_len) and its length, question text. A query
    that cannot be read gives {"error": "FILE:LINE: why"} (raised in input order by the caller, so worker
    processes never raise)."""

    def __init__(self, queries: List[Tuple[int, object]], prep: Preprocessing, where: Optional[str] = None,
                 base: Optional[str] = None):
        self.queries, self.prep, self.where = queries, prep, where
        self.base = base or os.getcwd()

    def __len__(self):
        return len(self.queries)

    def _path(self, q: dict, field: str) -> str:
        p = q[field]
        if not isinstance(p, str):
            raise QueryError(f"field '{field}' must be a file path (a string), got {json.dumps(p)}")
        return p if os.path.isabs(p) else os.path.join(self.base, p)

    def _load(self, q) -> Dict:
        from mmkernels.data.images import load_image
        from mmkernels.data.speech import load_audio

        if not isinstance(q, dict):
            raise QueryError(f"expected a JSON object, got {_json_type(q)}")
        mods = self.prep.modalities
        for m in mods:
            if not any(k in q for k in FIELDS[m]):
                raise QueryError(f"missing field '{FIELDS[m][0]}' (the model uses {m})")
        n = self.prep.max_audio_len
        item = {"image": torch.zeros(28, 28, dtype=torch.uint8), "audio": torch.zeros(n),
                "audio_lengths": torch.tensor(1), "text": str(q.get("question", q.get("text", "")))}
        if "image" in mods:
            item["image"] = load_image(self._path(q, "image"))
        if "audio" in mods:
            wav = torch.from_numpy(load_audio(self._path(q, "audio"), self.prep.sample_rate)[:n])
            item["audio"][:len(wav)] = wav
            item["audio_lengths"] = torch.tensor(max(1, len(wav)))
        return item

    def __getitem__(self, i) -> Dict:
        ln, q = self.queries[i]
        try:
            return self._load(q)
        except (OSError, ValueError) as e:  # missing / unreadable files (FileNotFoundError is an OSError)
            return {"error": f"{self.where}:{ln}: {e}" if self.where else str(e)}


def collate(items: List[Dict]) -> Dict:
    """Stacked tensors and the texts; "error": the first query's error in input order, else None."""
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"error": errors[0]}
    out = {k: torch.stack([it[k] for it in items]) for k in ("image", "audio", "audio_lengths")}
    out["text"] = [it["text"] for it in items]
    out["error"] = None
    return out


class Predictor:
    """A saved model (save_pretrained folder, or an exported folder) with its tokenizer and preprocessing."""

    def __init__(self, model_dir: str, backend: Optional[str] = "keep", max_text_len: Optional[int] = None,
                 max_audio_seconds: Optional[float] = None):
        from mmkernels.models.config import WEIGHTS_NAME, load_preprocessing, read_config
        from mmkernels.models.export import is_exported, load_exported
        from mmkernels.models.text import saved_tokenizer

        self.exported = is_exported(model_dir) and not os.path.exists(os.path.join(model_dir, WEIGHTS_NAME))
        if self.exported:
            if backend not in ("keep", None):
                raise ValueError(f"{model_dir} is an exported program: its ops are fixed at export "
                                 f"(--backend {backend} does not apply)")
            self.config = read_config(model_dir)
            self.model = None
            self.program = load_exported(model_dir)
        else:
            from mmkernels.models.fusion_model import FusionModel
            self.model = FusionModel.from_pretrained(model_dir, kernel_backend=backend).eval()
            self.config = self.model.config
        if self.config.task == "token_classification":
            raise ValueError("mmkernels-predict answers with one label per query; this model tags tokens "
                             "(model.task token_classification): evaluate it with mmkernels-eval")
        self.saved_preprocessing = load_preprocessing(model_dir)
        self.prep = Preprocessing.of_saved(self.saved_preprocessing, self.config.modalities, max_text_len,
                                           max_audio_seconds)
        self.tokenizer = saved_tokenizer(model_dir, self.config.text_model_path)
        self.labels = self.config.labels or [str(i) for i in range(self.config.num_labels)]

    def inputs(self, batch: Dict) -> Dict[str, torch.Tensor]:
        """The model's inputs of a collated batch (the texts tokenized as in training)."""
        enc = self.tokenizer(batch["text"], padding="max_length", truncation=True, max_length=self.prep.max_text_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "image": batch["image"],
                "audio": batch["audio"], "audio_lengths": batch["audio_lengths"]}

    @torch.no_grad()
    def logits(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits of a batch, computed FORWARD_ROWS rows at a time (the last block padded with copies
        of its last row): every forward has the same shape, so the matrix kernels take the same paths
        (below about 8 rows they take others, whose rounding differs) and a query's answer does not
        depend on the batch it came in, nor on its place there (the number of threads may change the last bits)."""
        from mmkernels.models.export import INPUTS

        n = inputs["image"].shape[0]
        out = []
        for s in range(0, n, FORWARD_ROWS):
            block = {k: inputs[k][s:s + FORWARD_ROWS] for k in INPUTS}
            pad = FORWARD_ROWS - block["image"].shape[0]
            if pad:
                block = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in block.items()}
            if self.exported:
                logits = self.program(*(block[k] for k in INPUTS))
            else:  # no text_keys: a frozen text encoder too runs on the whole block, of the same shape
                logits = self.model(block)["logits"]
            out.append(logits[:FORWARD_ROWS - pad])
        return torch.cat(out)

    def answers(self, logits: torch.Tensor, queries: Sequence[dict], top_k: int) -> List[dict]:
        probs = logits.float().softmax(-1)
        top = probs.topk(min(top_k, len(self.labels)))
        values, indices = top.values.tolist(), top.indices.tolist()  # one read per batch
        return [{**q, "answer": self.labels[ix[0]], "score": round(v[0], 4),
                 "top": [{"answer": self.labels[i], "score": round(s, 4)} for s, i in zip(v, ix)]}
                for q, v, ix in zip(queries, values, indices)]

    def predict(self, queries: List[Tuple[int, object]], where: Optional[str] = None, base: Optional[str] = None,
                batch_size: int = 64, workers: int = 1, top_k: int = 3, progress: bool = False) -> Iterator[dict]:
        """The answers to `queries` ((line number, query) pairs), in input order, a batch at a time; relative
        paths are taken from `base`. Raises QueryError at the first query that cannot be read, naming `where`
        (the queries file) and the line."""
        from tqdm.auto import tqdm

        ds = QueryDataset(queries, self.prep, where, base)
        workers = min(workers, max(0, -(-len(queries) // batch_size) - 1))  # no worker for one batch
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=collate)
        with tqdm(total=len(queries), desc="predict", unit="query", leave=False, disable=not progress) as bar:
            start = 0
            for batch in loader:
                if batch["error"] is not None:
                    raise QueryError(batch["error"])
                n = len(batch["text"])
                yield from self.answers(self.logits(self.inputs(batch)), [q for _, q in queries[start:start + n]],
                                        top_k)
                start += n
                bar.update(n)
