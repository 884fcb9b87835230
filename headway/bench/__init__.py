"""Load generator, baselines and benchmark reports (``headway bench``).

Modules, one job each (import them directly; nothing heavy is imported here):

- ``text``: seeded English-like prompt text, exact token counts given a tokenizer;
- ``workloads``: fixed, Poisson, shared-prefix and multi-turn workloads;
- ``client``: streaming OpenAI-compatible client that runs a workload and times each request;
- ``report``: percentiles, per-target summaries, ratios to a baseline, rich table and JSON;
- ``baselines``: HF transformers ``generate`` in-process and llama.cpp's server as a subprocess;
- ``roofline``: measured matmul FLOP/s at the decoder's GEMM shapes, decode roofline fraction;
- ``cli``: the ``bench`` Typer command and ``run_bench`` for Python callers.
"""
