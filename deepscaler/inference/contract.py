"""What the inference server, both backends, the client and the launchers share.

The server (``server.py``) imports the backends (``hf.py``, ``vllm_backend.py``); the backends
import only this module, never the server, so there is no cycle. The client and the
launchers (``deepscaler.launch``, eval) take the token variable from here. Standard library
only: importing it is cheap (``max_model_len`` imports the probe's length lazily, ``write_token``
the store's owner-only folder).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from deepscaler.config import Config

# Every request needs "Authorization: Bearer $DEEPSCALER_SERVER_TOKEN". The local launcher and
# eval generate one per attempt; a Slurm submit writes one per stage to TOKEN_FILE, which both of
# a stage's jobs (main and servers) read, and a requeue reuses. Only the environment of the
# stage's own processes ever holds it: never a script, a pickle, a log or a command line.
TOKEN_ENV = "DEEPSCALER_SERVER_TOKEN"
TOKEN_FILE = ("secrets", "token")  # under the stage dir: secrets/ is 0700, token 0600
# A server answers POST /hello {"nonce"} with HELLO_PROOF(token, nonce, its address), so a client
# knows it talks to a holder of the token before it sends the token (a listener that a forged
# servers/*.addr named cannot answer, and relaying the nonce to a real server gives the wrong
# address).


class TokenError(RuntimeError):
    """The stage's token file is missing, or others could read or have replaced it. One line."""


def token_path(stage_root: str | os.PathLike) -> Path:
    return Path(stage_root).joinpath(*TOKEN_FILE)


def write_token(stage_root: str | os.PathLike) -> str:
    """A fresh token in ``<stage>/secrets/token`` (mode 0600 from its creation: O_EXCL on a
    temp name, then a rename over the old one); returns it. Called once per submit."""
    from deepscaler.store import private_dir  # 0700, ours, not a symlink (StoreError otherwise)

    path = token_path(stage_root)
    private_dir(path.parent)
    token = secrets.token_hex(16)
    tmp = path.with_name(f".token.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return token


def read_token(stage_root: str | os.PathLike) -> str:
    """The token a submit wrote; TokenError (one line naming the file) if it is missing, not
    this user's, readable or writable by others, or not a token."""
    path = token_path(stage_root)
    try:
        folder = os.lstat(path.parent)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise TokenError(f"{path} is missing: the server token is written at submit (submit the stage again)") from None
    except OSError as e:  # ELOOP: a symlink
        raise TokenError(f"cannot open {path} ({e.strerror}): it must be a plain file; "
                         "submit the stage again") from None
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as f:
        st = os.fstat(f.fileno())
        for what, s in (("folder " + str(path.parent), folder), (str(path), st)):
            if s.st_uid != os.geteuid() or s.st_mode & 0o077:
                raise TokenError(f"{what} is owned by uid {s.st_uid} with mode {stat.S_IMODE(s.st_mode):04o}: "
                                 f"the server token must be this user's (uid {os.geteuid()}) and private "
                                 "(0700 folder, 0600 file); submit the stage again")
        token = f.read(256).strip()
    if len(token) != 32 or any(c not in "0123456789abcdef" for c in token):
        raise TokenError(f"{path} does not hold a server token; submit the stage again")
    return token


def hello_proof(token: str, nonce: str, address: str) -> str:
    """What a server that holds ``token`` answers to ``nonce`` at ``address`` (host:port)."""
    return hmac.new(token.encode(), f"deepscaler-hello\n{nonce}\n{address}".encode(), hashlib.sha256).hexdigest()


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
