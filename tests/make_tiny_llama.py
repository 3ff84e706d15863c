"""A small randomly initialised Llama (~41 M parameters) with a local word-level tokenizer, for vLLM on the CPU.

Big enough that a decode step takes ~10 ms on one core: with a smaller model vLLM's API server spends all
its time streaming tokens, its /metrics answers late, and a batch is over before anyone can sample it.
"""
import sys

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(509)] + ["hello", "world", "the", "a", "lore"]
tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
cfg = LlamaConfig(vocab_size=len(words), hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float32")
LlamaForCausalLM(cfg).save_pretrained(out)
tok.save_pretrained(out)
print("ok", len(words))
