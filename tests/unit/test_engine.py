"""The trainer's device-facing pieces with real DeepSpeed on CPU: activation checkpointing,
the reference pass, what a publish gathers, and which GPU each rank takes.

GPU-only paths are simulated at one named boundary each: the number of visible CUDA devices
(rank-to-device binding), and bf16 compute on the CPU (what a publish gathers on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from deepscaler.config import TrainerConfig
from deepscaler.hf_loading import load_causal_lm
from deepscaler.trainer import engine as engine_mod
from deepscaler.trainer.checkpoint import full_model_state, publish_state
from deepscaler.trainer.engine import build_engine, cuda_device_index, prepare, resolve_ranks, update
from deepscaler.trainer.packing import pack
from tests.helpers.ckpt_worker import make_engine, seed_all, tiny_model, train
from tests.unit.test_attention import LENGTHS, Sequences


@pytest.fixture
def saved_model(tmp_path):
    """A tiny model folder: the trainer loads its policy with from_pretrained (eval mode)."""
    tiny_model(seed=0).save_pretrained(tmp_path)
    return str(tmp_path)


def _count_checkpointed_layers(model) -> list[int]:
    calls: list[int] = []
    for i, layer in enumerate(model.model.layers):
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, _i=i, **kwargs):
            calls.append(_i)
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    return calls


@pytest.mark.parametrize("checkpointing", [True, False])
def test_update_checkpoints_every_decoder_layer_when_configured(dist, saved_model, checkpointing):
    tc = TrainerConfig()
    tc.deepspeed.activation_checkpointing = checkpointing
    model = load_causal_lm(saved_model, "float32")
    assert not model.training  # what from_pretrained hands the trainer
    ref = load_causal_lm(saved_model, "float32")
    engine = build_engine(model, tc, total_updates=4)
    source = Sequences(LENGTHS)
    batches = [pack(source, [0, 1]), pack(source, [2, 3])]
    prepare(engine, ref, batches, tc, 1.0, tis_cap=None)
    calls = _count_checkpointed_layers(model) if checkpointing else []
    update(engine, batches, source.input_ids.numel(), tc, 1.0, world_size=1)
    layers = len(model.model.layers)
    if checkpointing:
        assert sorted(calls) == sorted(list(range(layers)) * len(batches))
    else:
        assert all(not layer.gradient_checkpointing for layer in model.model.layers)


def test_the_passes_without_grad_compute_no_entropy(dist, saved_model, monkeypatch):
    tc = TrainerConfig()
    model, ref = load_causal_lm(saved_model, "float32"), load_causal_lm(saved_model, "float32")
    engine = build_engine(model, tc, total_updates=1)
    with_entropy = []
    real = engine_mod.token_log_probs_and_entropy
    monkeypatch.setattr(engine_mod, "token_log_probs_and_entropy",
                        lambda *a, **k: (with_entropy.append(1), real(*a, **k))[1])
    batches = [pack(Sequences(LENGTHS), range(4))]
    prepare(engine, ref, batches, tc, 1.0, tis_cap=None)  # the reference and old-log-prob passes
    assert with_entropy == [] and batches[0].ref_logp is not None and batches[0].old_logp is not None
    update(engine, batches, 100, tc, 1.0, world_size=1)
    assert len(with_entropy) == 2  # one policy chunk: forward, and its checkpointed recompute in backward


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_publish_gathers_exactly_the_masters_cast_to_the_publish_dtype(dist, stage):
    """Simulated boundary: bf16 compute with fp32 masters, as on a GPU, here on the CPU."""
    seed_all(0)
    engine = make_engine(stage, seed=0, bf16=True)
    train(engine, 2)
    masters = {k: v.to(torch.bfloat16) for k, v in full_model_state(engine).items()}
    published = publish_state(engine, torch.bfloat16)
    assert published.keys() == masters.keys()
    for name, tensor in published.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, masters[name]), name
    if stage < 3:  # the module's own tensors, not copies
        live = dict(engine.module.named_parameters())
        assert published["lm_head.weight"].data_ptr() == live["lm_head.weight"].data_ptr()


SLURM_TASK = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
              "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("visible, device", [(1, 0), (8, 3)])
def test_a_slurm_task_takes_the_gpu_its_binding_gives_it(visible, device):
    """Simulated boundary: the number of GPUs the task sees (srun --gpus-per-task=1 binds one,
    numbered 0; --gpus-per-node shows all eight)."""
    env = dict(SLURM_TASK)
    dist = resolve_ranks(env, cuda_devices=visible)
    assert (dist.rank, dist.world_size, dist.local_rank) == (11, 16, 3)
    assert dist.device == torch.device("cuda", device)
    assert env["LOCAL_RANK"] == str(device)  # DeepSpeed sets its device from LOCAL_RANK
    assert (env["RANK"], env["WORLD_SIZE"]) == ("11", "16")


def test_torchrun_variables_win_and_a_cpu_rank_stays_on_the_cpu():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **SLURM_TASK}
    dist = resolve_ranks(env, cuda_devices=0)
    assert (dist.rank, dist.world_size, dist.local_rank, dist.device.type) == (1, 2, 1, "cpu")


def test_a_rank_without_its_gpu_is_a_one_line_error():
    with pytest.raises(RuntimeError) as err:
        cuda_device_index(local_rank=3, visible=2)
    assert "\n" not in str(err.value) and "local rank 3" in str(err.value) and "2 GPU(s)" in str(err.value)


@pytest.mark.parametrize("old_logprobs", ["trainer", "inference"])
def test_the_first_update_takes_its_ratio_against_the_trainers_own_log_probs(dist, saved_model, old_logprobs):
    """The sampler's log-probs are the policy's plus noise (other kernels, as vLLM's bf16 ones
    on a GPU). Against the trainer's own, the first update's ratio is exactly 1 and nothing is
    clipped; against the sampler's, clipping fires on the noise."""
    tc = TrainerConfig()
    tc.loss.old_logprobs = old_logprobs
    model, ref = load_causal_lm(saved_model, "float32"), load_causal_lm(saved_model, "float32")
    engine = build_engine(model, tc, total_updates=1)
    source = Sequences(LENGTHS)
    source.advantages = torch.tensor([1.0, -1.0, 2.0, -0.5])
    batch = pack(source, range(4))
    with torch.no_grad():
        own, _ = engine_mod.packed_log_probs(model, batch, 1.0, entropy=False)
    noise = torch.randn(own.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    batch.behaviour_logp = torch.where(batch.loss_mask, own + noise, torch.zeros_like(own))
    sums = prepare(engine, ref, [batch], tc, 1.0, tis_cap=None)
    stats = update(engine, [batch], batch.num_loss_tokens, tc, 1.0, world_size=1)
    first_ratio, first_clip = stats.ratio / stats.loss_tokens, stats.clip_fraction / stats.loss_tokens
    if old_logprobs == "trainer":
        assert first_ratio == 1.0 and first_clip == 0.0
        assert float(sums["mismatch_kl"]) > 0.05  # k3 of N(0, 0.5) noise: about 0.125
    else:
        assert first_ratio != 1.0 and first_clip > 0.1
        assert sums == {}  # no extra pass: nothing to compare


def test_a_non_finite_step_is_refused_before_its_weights_are_published(tmp_path):
    from deepscaler.store import RunStore
    from deepscaler.trainer.train import TrainingDiverged, refuse_non_finite

    store = RunStore(tmp_path, "run", 1)
    refuse_non_finite({"pg_loss": 0.1, "kl": 0.0, "entropy": 2.0, "grad_norm": None}, 3, store)  # fine
    with pytest.raises(TrainingDiverged) as err:
        refuse_non_finite({"pg_loss": float("nan"), "kl": 0.0, "entropy": 2.0, "grad_norm": float("inf")}, 7, store)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("step 7: pg_loss nan, grad_norm inf: stopped before publishing")
    assert "--resume-step latest" in msg and "trainer.optimizer.lr" in msg
