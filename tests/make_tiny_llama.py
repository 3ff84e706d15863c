"""A tiny randomly initialised Llama with a small local word-level tokenizer, for vLLM on the CPU."""
import sys

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(509)] + ["hello", "world", "the", "a", "lore"]
tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
cfg = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float32")
LlamaForCausalLM(cfg).save_pretrained(out)
tok.save_pretrained(out)
print("ok", len(words))
