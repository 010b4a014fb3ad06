"""Text + image + audio fusion model: encoders -> cross-modal blocks (each modality attends to the
others on `cross_modal_attention`) -> masked mean pooling -> Gated Multimodal Unit (`gated_fusion`)
-> head (answer / classification on the fused vector, or token classification on text tokens)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# the config and the files of a saved folder: config.py (read without the model's code)
from mmkernels.models.config import (ALL_MODALITIES, CONFIG_NAME, PREPROCESSING_NAME, WEIGHTS_NAME,  # noqa: F401
                                     ModelConfig, load_preprocessing, read_config, saved_config,
                                     write_plain_json)
from mmkernels.models.augment import AudioAugmentation
from mmkernels.models.encoders import AudioEncoder, ImageEncoder
from mmkernels.models.text import apply_finetune_policy, build_text_encoder
from mmkernels.nn.attention import CrossModalBlock
from mmkernels.nn.fusion import GatedMultimodalUnit
from mmkernels.utils.atomic import new_dir


def pool(m: str, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Image: its summary token (token 0); text and audio: mean over valid tokens."""
    if m == "image":
        return x[:, 0] * (lengths > 0).to(x.dtype).unsqueeze(-1)
    return masked_mean(x, lengths)


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


class FusionModel(nn.Module):
    def __init__(self, config: ModelConfig, load_pretrained_text: bool = True):
        super().__init__()
        self.config = c = config
        d, be = c.d_model, c.kernel_backend
        self.modalities = list(c.modalities)
        if "text" in self.modalities:
            self.text = build_text_encoder(c.text_encoder, c.text_hidden, c.text_layers, c.text_heads,
                                           bert_config=None if load_pretrained_text else c.bert_config,
                                           model_path=c.text_model_path)
            apply_finetune_policy(self.text, c.text_finetune, c.text_top_k, c.text_freeze_embeddings)
            self.text_proj = nn.Linear(self.text.config.hidden_size, d)
        if "image" in self.modalities:
            self.image = ImageEncoder(d, c.image_channels, c.image_layers, c.num_heads, c.dropout, backend=be)
        if "audio" in self.modalities:
            augmentation = AudioAugmentation(c.audio_speed_perturb, c.audio_pitch_perturb, c.audio_noise_snr,
                                             c.audio_time_masks, c.audio_freq_masks)
            self.audio = AudioEncoder(d, c.n_mels, c.audio_layers, c.num_heads, c.dropout, backend=be,
                                      augmentation=augmentation, frontend=c.audio_frontend)
        M = len(self.modalities)
        self.fusion = nn.ModuleList()
        if M > 1:
            for _ in range(c.fusion_layers):
                self.fusion.append(nn.ModuleDict({
                    m: CrossModalBlock(d, c.num_heads, M - 1, c.ffn_mult, c.dropout, backend=be) for m in self.modalities}))
        if c.aux_digit_loss:
            self.aux_heads = nn.ModuleDict({m: nn.Linear(d, 10) for m in ("image", "audio") if m in self.modalities})
        self.gmu = GatedMultimodalUnit([d] * M, c.gmu_hidden, backend=be)
        if c.task == "token_classification":
            self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c.num_labels))
        else:
            self.head = nn.Sequential(nn.LayerNorm(c.gmu_hidden), nn.Linear(c.gmu_hidden, c.gmu_hidden), nn.GELU(),
                                      nn.Dropout(c.dropout), nn.Linear(c.gmu_hidden, c.num_labels))

    TEXT_CACHE_SIZE = 4096

    def prepare_batch(self, batch: Dict[str, torch.Tensor], device) -> Dict:
        """`batch` moved to `device`; with a frozen text encoder and the batch still on the host, plus
        `text_keys` (one key per row, read here from host memory): the frozen-encoder cache then needs
        no read back from the device in the forward."""
        out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids, am = batch.get("input_ids"), batch.get("attention_mask")
        if hasattr(self, "text") and self._text_frozen() and ids is not None and am is not None \
                and ids.device.type == "cpu" and am.device.type == "cpu":
            rows = torch.cat([ids, am.to(ids.dtype)], 1).contiguous().numpy()
            out["text_keys"] = [r.tobytes() for r in rows]
        return out

    @torch.no_grad()
    def _frozen_text(self, ids: torch.Tensor, am: torch.Tensor, keys: Optional[List[bytes]]) -> torch.Tensor:
        """Frozen encoder (eval mode, no graph). With the rows' `keys` (prepare_batch), each distinct
        question is encoded once and its output kept in a bounded cache (cleared whenever weights are
        loaded): exact, not an approximation. Reads nothing back from the device."""
        if keys is None or len(keys) != ids.shape[0]:
            return self.text(input_ids=ids, attention_mask=am).last_hidden_state
        cache = self.__dict__.setdefault("_text_cache", {})
        first: Dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        missing = [k for k in first if k not in cache]
        if len(cache) + len(missing) > self.TEXT_CACHE_SIZE:
            cache.clear()
            missing = list(first)
        if missing:
            if len(missing) == len(keys):  # every row new (and distinct): the batch as it is
                sel_ids, sel_am = ids, am
            else:
                rows = [first[k] for k in missing]  # host ints: row slices, no index tensor to copy over
                sel_ids = torch.cat([ids[i:i + 1] for i in rows])
                sel_am = torch.cat([am[i:i + 1] for i in rows])
            hm = self.text(input_ids=sel_ids, attention_mask=sel_am).last_hidden_state
            for k, h in zip(missing, hm):
                cache[k] = h
        return torch.stack([cache[k] for k in keys])

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_text_cache", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # .to() / .double() ...: cached outputs would be stale
        self.__dict__.pop("_text_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def _text_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.text.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "text") and self._text_frozen():
            self.text.eval()  # a frozen encoder runs without dropout
        return self

    def set_backend(self, backend: Optional[str]):
        """Switch every op of the model to `backend` (None = default dispatch, 'reference', ...)."""
        self.config.kernel_backend = backend
        for mod in self.modules():
            if hasattr(mod, "backend"):
                mod.backend = backend

    # ------------------------------------------------------------------ forward
    def encode(self, batch: Dict[str, torch.Tensor]):
        tokens, lengths = {}, {}
        if "text" in self.modalities:
            am = batch["attention_mask"]
            ids = batch["input_ids"]
            if self._text_frozen():
                h = self._frozen_text(ids, am, batch.get("text_keys"))
            else:
                h = self.text(input_ids=ids, attention_mask=am).last_hidden_state
            tokens["text"] = self.text_proj(h)
            lengths["text"] = am.sum(1).to(torch.int32)
        if "image" in self.modalities:
            tokens["image"], lengths["image"] = self.image(batch["image"])
        if "audio" in self.modalities:
            tokens["audio"], lengths["audio"] = self.audio(batch["audio"], batch["audio_lengths"])
        return tokens, lengths

    def forward(self, batch: Dict[str, torch.Tensor], drop: Sequence[str] = (), return_gates: bool = False):
        """batch: input_ids, attention_mask, image, audio, audio_lengths (+ labels: adds `loss`).
        drop: modalities removed (their tokens are masked out of attention and of the GMU)."""
        tokens, lengths = self.encode(batch)
        B = next(iter(tokens.values())).shape[0]
        dev = next(iter(tokens.values())).device
        present = torch.ones(len(self.modalities), B, dtype=torch.bool, device=dev)
        for i, m in enumerate(self.modalities):
            if m in drop:
                present[i] = False
                lengths[m] = torch.zeros_like(lengths[m])
                tokens[m] = torch.zeros_like(tokens[m])
        aux = {}
        if self.config.aux_digit_loss and self.training:
            key = {"image": "written", "audio": "heard"}
            for m, h in self.aux_heads.items():
                if key[m] in batch:
                    aux[m] = F.cross_entropy(h(pool(m, tokens[m], lengths[m])).float(), batch[key[m]])
        for layer in self.fusion:
            new = {}
            for m in self.modalities:
                others = [o for o in self.modalities if o != m]
                kv_len = torch.stack([lengths[o] for o in others], 1).to(torch.int32)
                new[m] = layer[m](tokens[m], [tokens[o] for o in others], kv_len, lengths[m])
            tokens = new
        out = {}
        if self.config.task == "token_classification":
            logits = self.head(tokens["text"])
        else:
            pooled = [pool(m, tokens[m], lengths[m]) for m in self.modalities]
            fused = self.gmu(pooled, present=present, return_gates=return_gates)
            if return_gates:
                fused, out["gates"] = fused
            logits = self.head(fused)
        out["logits"] = logits
        if "labels" in batch and batch["labels"] is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                                          ignore_index=-100)
            if aux:
                out["loss"] = out["loss"] + self.config.aux_digit_loss * sum(aux.values())
        return out

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str, preprocessing: Optional[dict] = None, tokenizer=None):
        """Config JSON + safetensors weights; with `preprocessing` (see PREPROCESSING_NAME) and the
        `tokenizer`, the folder holds everything a server needs to prepare inputs as in training.
        Written to a temporary folder beside `path` (plain writes), fsynced once and swapped in whole
        (utils.atomic.new_dir)."""
        from safetensors.torch import save_file
        with new_dir(path) as tmp:
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if preprocessing is not None:
                write_plain_json(os.path.join(tmp, PREPROCESSING_NAME), preprocessing)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})  # streamed to the file
            write_plain_json(os.path.join(tmp, CONFIG_NAME), saved_config(self))

    @classmethod
    def from_pretrained(cls, path: str, kernel_backend: Optional[str] = "keep", map_location="cpu") -> "FusionModel":
        from safetensors.torch import load_file
        w_path = os.path.join(path, WEIGHTS_NAME)
        for p in (os.path.join(path, CONFIG_NAME), w_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"not a saved mmkernels model: {p} is missing")
        cfg = read_config(path)
        if kernel_backend != "keep":
            cfg.kernel_backend = kernel_backend
        model = cls(cfg, load_pretrained_text=False)
        try:
            state = load_file(w_path, device=str(map_location))
        except Exception as e:
            raise ValueError(f"corrupt weights file {w_path}: {e}") from e
        model.load_state_dict(state)
        return model
