"""AlpacaEval prompts with the response lengths of several models (Llama-2 tokenizer counts)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np

from simulator.data import data_path

MODELS = ("llama-2-7b-chat-hf", "llama-2-13b-chat-hf", "vicuna-7b-v1.5", "gpt-3.5-turbo-0613")


@dataclass
class LengthData:
    prompts: list[str]
    datasets: np.ndarray
    prompt_tokens: np.ndarray  # instruction tokens (Llama-2 tokenizer)
    chat_prompt_tokens: np.ndarray  # with the Llama-2 chat template, what the engine prefills
    lengths: dict[str, np.ndarray]  # served model -> response tokens

    def subset(self, idx: np.ndarray) -> LengthData:
        return LengthData([self.prompts[i] for i in idx], self.datasets[idx], self.prompt_tokens[idx],
                          self.chat_prompt_tokens[idx], {m: v[idx] for m, v in self.lengths.items()})

    def __len__(self) -> int:
        return len(self.prompts)


def load_alpaca() -> LengthData:
    """Join the 805 AlpacaEval instructions with their per-model response token counts (by row order)."""
    csv_path = data_path("alpaca_eval/response_lengths_llama2tok.csv")
    outputs = data_path("alpaca_eval/model_outputs/llama-2-7b-chat-hf.json")
    with outputs.open() as f:
        records = json.load(f)
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(records):
        raise ValueError(f"{csv_path} has {len(rows)} rows but {outputs} has {len(records)} prompts")
    lengths = {}
    for m in MODELS:
        col = f"out_tokens_llama2tok__{m}"
        try:
            lengths[m] = np.array([int(r[col]) for r in rows])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{csv_path}: column {col} missing or not integer ({exc})") from exc
    for i, (row, rec) in enumerate(zip(rows, records, strict=True)):
        if row["dataset"] != rec["dataset"]:
            raise ValueError(f"{csv_path}:{i + 2}: dataset {row['dataset']!r} does not match {outputs} entry {i}")
    return LengthData([r["instruction"] for r in records], np.array([r["dataset"] for r in rows]),
                      np.array([int(r["instruction_tokens_llama2"]) for r in rows]),
                      np.array([int(r["prompt_tokens_llama2_chat_template"]) for r in rows]), lengths)
