"""Image files as the model's image input: uint8 (28, 28), light strokes on black."""
from __future__ import annotations

import numpy as np
import torch


def load_image(path: str) -> torch.Tensor:
    """Image file -> uint8 (28, 28), white digit on black like MNIST (dark-on-light input is inverted)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading image files needs Pillow: pip install pillow") from e
    try:
        im = Image.open(path).convert("L").resize((28, 28), Image.BILINEAR)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
    x = np.asarray(im, dtype=np.uint8)
    if x.mean() > 127:
        x = 255 - x
    return torch.from_numpy(x.copy())
