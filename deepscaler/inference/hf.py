"""The transformers backend: the tiny preset's inference on CPU, and a reference for vLLM.

Why a decode loop of its own instead of ``model.generate``: the contract needs one RNG
stream per sample, seeded from (request seed, prompt index, sample index), so that a sample
does not depend on what else is in the batch, and the log-prob of every sampled token under
exactly the distribution it was drawn from. ``generate`` offers neither.

Sampling follows vLLM's ``logprobs_mode="processed_logprobs"`` step by step, so both backends
mean the same thing by a log-prob:

- temperature > 0: ``x = logits.float() / temperature``; with top_p < 1, the tokens outside
  the nucleus get -inf (vLLM's rule: sort ascending, drop tokens whose cumulative probability
  is <= 1 - top_p, always keep the most likely); draw from softmax(x) and report
  ``log_softmax(x)[token]``. With top_p = 1 (training) that is exactly the trainer's
  ``token_log_probs(logits, tokens, temperature)``.
- temperature = 0: greedy, and the log-prob is ``log_softmax(logits)`` (temperature 1).

Weight updates copy the new safetensors into the live parameters (every tensor, checked
first), so an update is a file read plus a memcpy.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from deepscaler.faults import fault_active
from deepscaler.hf_loading import load_causal_lm, load_tokenizer
from deepscaler.inference.contract import GenerateRequest, eos_token_ids, request_seed, sample_seed
from deepscaler.process import one_thread_if_small
from deepscaler.safetensors_io import load_tensors
from deepscaler.weights_format import probe_logprobs, weights_files

log = logging.getLogger("deepscaler.inference.hf")

# Sequences decoded together in one forward batch; more rows are done in chunks (results do
# not depend on the chunking: every sample has its own RNG stream).
MAX_BATCH_ROWS = 64
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


class WeightLoadError(ValueError):
    """A weights folder that does not fit the live model. One line naming the tensor."""


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log-probs ``[B, V]`` of the distribution the next token is drawn from (see the module doc)."""
    x = logits.float()
    if temperature <= 0:
        return torch.log_softmax(x, dim=-1)
    x = x / temperature
    if top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=False)
        cumulative = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # keep at least the most likely token
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.log_softmax(x, dim=-1)


class HFBackend:
    name = "hf"

    def __init__(self, source: str, dtype: str, max_model_len: int, revision: str | None = None):
        self.model = load_causal_lm(source, dtype, revision).eval()
        self.tokenizer = load_tokenizer(source, revision)
        self.eos = eos_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        config = self.model.config.get_text_config()
        self.vocab_size = int(config.vocab_size)
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_model_len > limit:
            raise ValueError(f"inference.max_model_len ({max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        self.max_model_len = max_model_len
        self.device = next(self.model.parameters()).device
        one_thread_if_small(self.model, self.device)

    # ------------------------------------------------------------------ sampling

    @torch.inference_mode()
    def generate(self, req: GenerateRequest) -> list[list[dict]]:
        base = request_seed(req.seed)
        rows = [(p, s) for p in range(len(req.prompts)) for s in range(req.n)]
        out: list[list[dict]] = [[{} for _ in range(req.n)] for _ in req.prompts]
        for first in range(0, len(rows), MAX_BATCH_ROWS):
            chunk = rows[first:first + MAX_BATCH_ROWS]
            samples = self._decode([req.prompts[p] for p, _ in chunk],
                                   [sample_seed(base, p, s) for p, s in chunk], req)
            for (p, s), sample in zip(chunk, samples):
                out[p][s] = sample
        return out

    def _decode(self, prompts: list[list[int]], seeds: list[int], req: GenerateRequest) -> list[dict]:
        """Sample one continuation per row: left-padded batch, KV cache, per-row generators."""
        rows, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((rows, width), self.eos[0], dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        # A row stops at eos, at max_tokens, or where the context is full (reported as "length").
        budget = [min(req.max_tokens, self.max_model_len - len(p)) for p in prompts]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        finish: list[str | None] = [None] * rows
        eos = set(self.eos)

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True)
        cache, next_position = out.past_key_values, positions[:, -1:] + 1
        for _ in range(max(budget)):
            logp = sampling_logprobs(out.logits[:, -1], req.temperature, req.top_p).cpu()
            probs = logp.exp() if req.temperature > 0 else None
            chosen = []
            for i in range(rows):
                if finish[i] is not None:  # finished rows ride along; their output is ignored
                    chosen.append(tokens[i][-1])
                    continue
                if req.temperature <= 0:
                    t = int(logp[i].argmax())
                else:
                    t = int(torch.multinomial(probs[i], 1, generator=generators[i]))
                tokens[i].append(t)
                logprobs[i].append(float(logp[i, t]))
                if t in eos:
                    finish[i] = "stop"
                elif len(tokens[i]) >= budget[i]:
                    finish[i] = "length"
                chosen.append(t)
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
            out = self.model(input_ids=torch.tensor(chosen)[:, None].to(self.device),
                             attention_mask=mask.to(self.device), position_ids=next_position.to(self.device),
                             past_key_values=cache, use_cache=True)
            cache, next_position = out.past_key_values, next_position + 1
        return [{"token_ids": tokens[i], "logprobs": logprobs[i], "finish_reason": finish[i],
                 "truncated": finish[i] == "length"} for i in range(rows)]

    def probe(self, token_ids: list[int]) -> list[float]:
        """The trainer's own probe function on the live model: same code, same kernels."""
        return probe_logprobs(self.model, token_ids)

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def update(self, path: Path, step: int) -> dict:
        """Copy every tensor of the folder into the live model (strict: nothing missing,
        nothing extra, same shapes), checked before anything is written."""
        tensors: dict[str, torch.Tensor] = {}
        for f in weights_files(path):
            tensors.update(load_tensors(f))
        target = self.model.state_dict(keep_vars=True)
        for name, t in tensors.items():
            if name not in target:
                raise WeightLoadError(f"{path}: tensor {name!r} is not in the served model")
            if tuple(t.shape) != tuple(target[name].shape):
                raise WeightLoadError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                                      f"the served model {tuple(target[name].shape)}")
        loaded = {target[n].data_ptr() for n in tensors}
        missing = [n for n, v in target.items() if n not in tensors and v.data_ptr() not in loaded]  # tied: fine
        if missing:
            raise WeightLoadError(f"{path}: lacks {len(missing)} tensors of the served model, e.g. {missing[0]!r}")
        if fault_active("inference.partial_reload", step):
            layers = [int(m.group(1)) for n in tensors if (m := _LAYER_RE.search(n))]
            last = f".layers.{max(layers)}."
            tensors = {n: t for n, t in tensors.items() if last not in n}
            log.warning("FAULT inference.partial_reload@%d: skipping the tensors of layer %d", step, max(layers))
        for name, t in tensors.items():
            target[name].copy_(t)
        return {"method": "reload", "prefix_cache_reset": None}  # no prefix cache here

    def close(self) -> None:
        pass
