"""Image files as the model's image input: uint8 (28, 28), light strokes on black."""
from __future__ import annotations

import numpy as np
import torch


def load_image(path: str) -> torch.Tensor:
    """Image file -> uint8 (28, 28), white digit on black like MNIST (dark-on-light input is inverted).
    A missing file is a FileNotFoundError, anything unreadable a ValueError, both naming the file."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading image files needs Pillow: pip install pillow") from e
    try:
        with Image.open(path) as f:
            im = f.convert("L").resize((28, 28), Image.BILINEAR)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file not found: {path}") from e
    except Exception as e:  # what a decoder raises on bad data varies: OSError, SyntaxError, zlib.error...
        why = e.strerror if isinstance(e, OSError) and e.strerror else (
            "not an image file Pillow can read" if isinstance(e, Image.UnidentifiedImageError)
            else f"{type(e).__name__}: {e}")
        raise ValueError(f"cannot read image file {path}: {why}") from e
    x = np.asarray(im, dtype=np.uint8)
    if x.mean() > 127:
        x = 255 - x
    return torch.from_numpy(x.copy())
