"""What the inference server, both backends, the client and the launchers share.

The server (``server.py``) imports the backends (``hf.py``, ``vllm_backend.py``); the backends
import only this module, never the server, so there is no cycle. The client and the
launchers (``deepscaler.launch``, eval) take the token variable from here. Standard library
only: importing it is cheap (``max_model_len`` imports the probe's length lazily).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from deepscaler.config import Config

# Every request needs "Authorization: Bearer $DEEPSCALER_SERVER_TOKEN" when it is set; the
# launchers generate one per run and pass it to the servers and their clients.
TOKEN_ENV = "DEEPSCALER_SERVER_TOKEN"


@dataclass(frozen=True)
class GenerateRequest:
    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class BackendDead(RuntimeError):
    """The engine is gone (its process died): the server cannot serve and exits."""


class Backend(Protocol):
    """What the server needs from an engine (``hf.HFBackend``, ``vllm_backend.VllmBackend``)."""

    name: str  # "hf" | "vllm"
    max_model_len: int  # prompt + response tokens
    vocab_size: int  # token ids must be < this

    def generate(self, req: GenerateRequest) -> list[list[dict]]: ...
    def probe(self, token_ids: list[int]) -> list[float]: ...
    def update(self, path: Path, step: int) -> dict: ...  # {"method", "prefix_cache_reset"}
    def close(self) -> None: ...


# --------------------------------------------------------------------------- shared rules


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The RNG seed of one sample: a function of (request seed, prompt index, sample index)
    only, so a sample is the same whatever else is in the batch. 63 bits (vLLM and
    torch.Generator both take it)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def request_seed(seed: int | None) -> int:
    """A request without a seed gets a random one (not reproducible, as asked)."""
    return secrets.randbits(63) if seed is None else seed


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Where sampling stops: the tokenizer's eos plus generation_config's eos ids (an int or
    a list; DeepSeek-R1's generation config names the same id as its tokenizer)."""
    ids: list[int] = []
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    extra = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    candidates += extra if isinstance(extra, (list, tuple)) else [extra]
    for i in candidates:
        if isinstance(i, int) and i >= 0 and i not in ids:
            ids.append(i)
    if not ids:
        raise ValueError("the model has no eos token id (tokenizer and generation_config.json name none)")
    return ids


def max_model_len(cfg: Config) -> int:
    """inference.max_model_len, or the longest a rollout can be (prompt + response), and never
    shorter than the weight-sync probe, which every update sends (a tiny preset's context can
    be shorter than the probe)."""
    from deepscaler.weights_format import PROBE_MAX_TOKENS

    rollout = cfg.data.max_prompt_tokens + cfg.sampling.max_response_tokens
    return cfg.inference.max_model_len or max(rollout, PROBE_MAX_TOKENS + 1)
