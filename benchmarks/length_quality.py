"""Response-length estimator quality (issue: length estimator). Prints tables and a RESULT line.

k-fold cross-validation over AlpacaEval prompts (no prompt in both train and test) for every served
model and estimator, transfer between models, and serving latency (batch of 1, OMP_NUM_THREADS=1).
--quick: 3 folds, llama-2-7b-chat and vicuna only; the full run does 5 folds on all four models.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd

from block.length.data import MODELS, load_alpaca
from block.length.estimator import LengthEstimator, quality_table, train
from block.length.models import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", default="results/length/minilm-embeddings.npz")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    data = load_alpaca()
    encoder = Encoder(args.cache)
    models = ("llama-2-7b-chat-hf", "vicuna-7b-v1.5") if args.quick else MODELS
    table = quality_table(data, encoder, k=3 if args.quick else 5, models=models)
    pd.set_option("display.width", 160)
    print(f"Length estimators, {3 if args.quick else 5}-fold CV over {len(data)} AlpacaEval prompts "
          "(MAE/MAPE lower is better; acc = share within 50/100 tokens)")
    print(table.round(3).to_string(index=False))
    path = Path("results/length") / "length-llama-2-7b-chat-hf.npz"
    train(data, "llama-2-7b-chat-hf", encoder, path)
    est = LengthEstimator.load(path, Encoder())  # a cold cache: every prompt is encoded, as when serving
    lat = []
    for p in data.prompts[:200]:
        t0 = time.perf_counter()
        est.predict([p])
        lat.append(time.perf_counter() - t0)
    lat_ms = np.array(lat) * 1e3
    print(f"\nserving latency, batch 1, 1 thread: P50 {np.percentile(lat_ms, 50):.1f} ms, "
          f"P99 {np.percentile(lat_ms, 99):.1f} ms (target P99 <= 15 ms)")
    own = table[(table.served_model == "llama-2-7b-chat-hf") & (table.trained_on == "llama-2-7b-chat-hf")]
    best = own[own.estimator == "minilm_ridge"].iloc[0]
    median = own[own.estimator == "global_median"].iloc[0]
    print(f"RESULT model=llama-2-7b-chat-hf mae={best.mae:.1f} acc100={best.acc100:.3f} "
          f"median_baseline_mae={median.mae:.1f}")


if __name__ == "__main__":
    main()
