"""Launch a real vLLM OpenAI server with the engine flags the experiments vary.

``python -m block.engines.vllm --model DIR --port P [--python /path/to/vllm-venv/python] ...`` turns our
engine flags into vLLM's and replaces itself with ``python -m vllm.entrypoints.openai.api_server``, so the
pid a cluster driver recorded is the engine's. vLLM may live in its own virtual environment (``--python``):
the project never imports it. Readiness is vLLM's ``/health``; its ``/metrics`` (num_requests_running,
num_requests_waiting, kv_cache_usage_perc, cache_config_info) is what the side-car reconciles with.
"""

from __future__ import annotations

import argparse
import os
import sys


def launch_command(*, python: str, model: str, host: str, port: int, served_model_name: str | None = None,
                   max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                   chunked_prefill: bool = True, gpu_memory_utilization: float | None = None,
                   max_model_len: int | None = None, dtype: str | None = None, extra: list[str] = ()) -> list[str]:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host, "--port", str(port)]
    for flag, value in (("--served-model-name", served_model_name), ("--max-num-seqs", max_num_seqs),
                        ("--max-num-batched-tokens", max_num_batched_tokens),
                        ("--gpu-memory-utilization", gpu_memory_utilization), ("--max-model-len", max_model_len),
                        ("--dtype", dtype)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd.append("--enable-chunked-prefill" if chunked_prefill else "--no-enable-chunked-prefill")
    return cmd + list(extra)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Start vLLM's OpenAI server with Block's engine flags")
    p.add_argument("--python", default=os.environ.get("BLOCK_VLLM_PYTHON", sys.executable),
                   help="interpreter that has vLLM installed (default: $BLOCK_VLLM_PYTHON or this one)")
    p.add_argument("--model", required=True, help="model directory or id (no hub downloads here)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--name", help="instance name (for logs only)")
    p.add_argument("--served-model-name")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--no-chunked-prefill", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--dtype")
    args, extra = p.parse_known_args(argv)
    cmd = launch_command(python=args.python, model=args.model, host=args.host, port=args.port,
                         served_model_name=args.served_model_name, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         chunked_prefill=not args.no_chunked_prefill,
                         gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                         dtype=args.dtype, extra=extra)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
