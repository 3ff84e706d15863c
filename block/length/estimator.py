"""Training, cross-validation and serving of the per-model response-length estimator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from block.length.data import MODELS, LengthData
from block.length.models import ESTIMATORS, EmbeddingRidge, Encoder, Features
from block.protocol import approx_tokens
from simulator.workload import Request

DEFAULT_DIR = Path("models")


def model_file(served_model: str, root: str | Path = DEFAULT_DIR) -> Path:
    """Where the estimator for one served model lives: the model id is part of the key."""
    return Path(root) / f"length-{served_model}.npz"


def features(data: LengthData, encoder: Encoder | None) -> Features:
    emb = encoder.encode(data.prompts)[0] if encoder is not None else None
    return Features(emb, np.array([approx_tokens(p) for p in data.prompts]), data.datasets)


def metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    err = np.abs(y - pred)
    return {"mae": float(err.mean()), "mape": float((err / y).mean() * 100), "acc50": float((err <= 50).mean()),
            "acc100": float((err <= 100).mean())}


def out_of_fold(x: Features, y: np.ndarray, name: str, k: int = 5, seed: int = 0) -> np.ndarray:
    """Predictions for every prompt from a model that never saw it (k-fold over prompts)."""
    folds = np.random.default_rng(seed).permutation(len(y)) % k
    pred = np.empty(len(y))
    for f in range(k):
        train, test = folds != f, folds == f
        pred[test] = ESTIMATORS[name]().fit(x.take(train), y[train]).predict(x.take(test))
    return pred


def quality_table(data: LengthData, encoder: Encoder, k: int = 5, models: tuple[str, ...] = MODELS) -> pd.DataFrame:
    """Every estimator on every served model with k-fold cross-validation, plus transfer rows: trained on
    one model's lengths, scored on another's (same folds, so no prompt is in both train and test)."""
    x = features(data, encoder)
    rows = []
    for served in models:
        y = data.lengths[served]
        for name in ESTIMATORS:
            rows.append({"served_model": served, "estimator": name, "trained_on": served,
                         **metrics(y, out_of_fold(x, y, name, k))})
    for source in models:
        pred = out_of_fold(x, data.lengths[source], EmbeddingRidge.name, k)
        for target in models:
            if target != source:
                rows.append({"served_model": target, "estimator": "minilm_ridge (transfer)", "trained_on": source,
                             **metrics(data.lengths[target], pred)})
    return pd.DataFrame(rows)


def train(data: LengthData, served_model: str, encoder: Encoder, path: str | Path) -> dict:
    if served_model not in data.lengths:
        raise ValueError(f"no lengths for served model {served_model!r}; available: {sorted(data.lengths)}")
    x = features(data, encoder)
    y = data.lengths[served_model]
    cv = metrics(y, out_of_fold(x, y, EmbeddingRidge.name))
    model = EmbeddingRidge().fit(x, y)
    meta = {"served_model": served_model, "encoder": encoder.name, "trained_on": len(y), "cv": cv}
    model.save(path, meta)
    return meta


@dataclass
class Estimate:
    tokens: int
    low: int  # 10th percentile
    high: int  # 90th percentile
    truncated: bool  # the prompt was longer than the encoder window and was cut


class LengthEstimator:
    """The served estimator: loaded once in the scheduler process, one encoder forward per prompt."""

    def __init__(self, model: EmbeddingRidge, meta: dict, encoder: Encoder):
        self.model = model
        self.meta = meta
        self.encoder = encoder

    @classmethod
    def load(cls, path: str | Path, encoder: Encoder | None = None) -> LengthEstimator:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no length model at {path}; train one with "
                                    f"`block length train --served-model <model id> --out {path}`")
        model, meta = EmbeddingRidge.load(path)
        encoder = encoder or Encoder(window=int(meta["encoder"].rsplit("/", 1)[1]))
        if encoder.name != meta["encoder"]:
            raise ValueError(f"{path} was trained with encoder {meta['encoder']}, not {encoder.name}")
        return cls(model, meta, encoder)

    @property
    def served_model(self) -> str:
        return self.meta["served_model"]

    def predict_detailed(self, prompts: list[str | bytes]) -> list[Estimate]:
        texts = []
        for i, p in enumerate(prompts):
            if isinstance(p, bytes):
                try:
                    p = p.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"prompt {i} is not valid UTF-8 (byte {exc.start}): decode it first") from exc
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty: there is nothing to estimate a length from")
            texts.append(p)
        emb, truncated = self.encoder.encode(texts)
        x = Features(emb, np.array([approx_tokens(t) for t in texts]))
        mid = self.model.predict(x)
        low, high = self.model.predict_band(x)
        return [Estimate(max(1, round(m)), max(1, round(lo)), max(1, round(hi)), bool(t))
                for m, lo, hi, t in zip(mid, low, high, truncated, strict=True)]

    def predict(self, prompts: list[str | bytes]) -> list[int]:
        return [e.tokens for e in self.predict_detailed(prompts)]

    def __call__(self, prompt: str) -> int:
        return self.predict([prompt])[0]


class TableEstimator:
    """Estimates looked up by prompt text: out-of-fold predictions for offline studies, so no prompt is
    ever estimated by a model that trained on it. Picklable, for parallel study workers."""

    def __init__(self, table: dict[str, int], fallback: int):
        self.table = table
        self.fallback = fallback

    def __call__(self, requests: Sequence[Request]) -> list[int]:
        return [self.table.get(r.prompt or "", self.fallback) for r in requests]


def out_of_fold_estimator(data: LengthData, served_model: str, encoder: Encoder, k: int = 5) -> TableEstimator:
    x = features(data, encoder)
    y = data.lengths[served_model]
    pred = out_of_fold(x, y, EmbeddingRidge.name, k)
    return TableEstimator({p: max(1, round(v)) for p, v in zip(data.prompts, pred, strict=True)}, int(np.median(y)))
