"""The GPU path on a real CUDA device (marked `gpu`; skipped where torch sees none): the trainer
with everything on the device, generation drawing on the device, bf16 autocast, the selector's
faiss index on the GPU against the CPU one (needs the faiss-gpu-cu12 extra) and VLLMGenerator
against the trainer (needs the vllm extra). The CPU halves of these are in test_generators.py and
test_trainer_device.py; bench/gpu_check.py measures the same things at size."""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch

from sponge.trainer import (
    CharTokenizer,
    ReMixConfig,
    ReMixTrainer,
    TinyModelConfig,
    TransformersGenerator,
    build_tiny_model,
    make_task,
    response_logprobs,
    warm_start,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: 2 heads of 32: vLLM's float32 attention (Triton) takes heads of 32 and more
SHAPE = TinyModelConfig(arch="gpt2", n_layer=2, n_embd=64, n_head=2, n_positions=32)


@pytest.fixture(scope="module")
def warm():
    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, SHAPE, seed=0).cuda()
    warm_start(model, tok, task, steps=50, seed=0)
    prompts, _ = task.sample(np.random.default_rng(1), 256)
    return task, tok, model.eval(), [tok.encode_prompt(p) for p in prompts]


def gaps(model, tok, gen, temperature=1.0, bf16=False):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        scores = response_logprobs(model, gen.prompt_tokens, gen.response_tokens, tok.pad_token_id, temperature)
    lp = scores.logprobs.float().cpu().numpy()
    return np.concatenate([np.abs(g - lp[i, :len(g)]) for i, g in enumerate(gen.logprobs)])


def small(**kw):
    base = {"prompts_per_step": 8, "group_size": 8, "eval_size": 64, "progress": False, "rollout_budget": 10**6,
            "device": "cuda"}
    return ReMixConfig(**{**base, **kw})


def test_trainer_keeps_everything_on_the_device_and_checkpoints_travel(warm, tmp_path):
    task, tok, model, _ = warm
    trainer = ReMixTrainer(copy.deepcopy(model).cpu(), tok, task, small(kl_coef=0.05, dynamic_sampling=False))
    assert trainer.device.type == "cuda"
    records = [trainer.step() for _ in range(4)]
    assert all(r["updates"] >= 1 and math.isfinite(r["loss"]) for r in records)
    for m in (trainer.policy, trainer.base, trainer.prev):
        assert all(p.device.type == "cuda" for p in m.parameters())
    assert any(r["n_replay"] > 0 for r in records[1:])        # replayed rows went through the device path
    trainer.save_checkpoint(tmp_path / "ck")
    on_cpu = ReMixTrainer(copy.deepcopy(model).cpu(), tok, task, small(kl_coef=0.05, dynamic_sampling=False,
                                                                       device="cpu"))
    on_cpu.load_checkpoint(tmp_path / "ck")
    for a, b in zip(on_cpu.policy.parameters(), trainer.policy.parameters()):
        assert torch.equal(a, b.cpu())


def test_generation_on_the_device_matches_the_trainer(warm):
    _, tok, model, prompts = warm
    gen = TransformersGenerator(tok).generate(model, prompts, 8, 1.0, seed=3)
    assert gaps(model, tok, gen).mean() < 1e-4
    again = TransformersGenerator(tok).generate(model, prompts, 8, 1.0, seed=3)
    assert again.response_tokens == gen.response_tokens      # a CUDA generator seeded the same draws the same
    bf16 = TransformersGenerator(tok, bf16=True).generate(model, prompts, 8, 1.0, seed=3)
    assert gaps(model, tok, bf16, bf16=True).mean() < 5e-2


def test_generation_does_not_wait_for_the_device_per_token(warm):
    _, tok, model, prompts = warm

    def syncs(n_tokens, temperature):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                # no early stop: both runs make the same forward passes, so any difference is the drawing
                TransformersGenerator(tok, stop_check_every=n_tokens).generate(model, prompts, n_tokens,
                                                                               temperature, seed=1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    # Drawing costs no wait for the device: sampled and greedy generation make the same number of
    # host synchronisations (the model's own forward may make some; torch.multinomial made 2 a token)
    assert syncs(16, 1.0) <= syncs(16, 0.0) + 1


def test_bf16_training_on_the_device(warm):
    task, tok, model, _ = warm
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, small(bf16=True, dynamic_sampling=False))
    records = [trainer.step() for _ in range(3)]
    assert trainer.recompute and all(math.isfinite(r["loss"]) for r in records)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())


def test_faiss_gpu_index_finds_what_the_cpu_index_finds():
    faiss = pytest.importorskip("faiss")
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        pytest.skip("faiss reports no GPU (needs the faiss-gpu-cu12 extra)")
    from sponge.selectors.objectives import FacilityLocation

    rng = np.random.default_rng(0)
    refs = rng.standard_normal((2048, 64)).astype(np.float32)
    data = rng.standard_normal((5000, 64)).astype(np.float32)
    cpu, gpu = FacilityLocation(refs, m=16, use_gpu=False), FacilityLocation(refs, m=16)
    assert gpu.on_gpu and not cpu.on_gpu
    a, b = cpu.profile(data), gpu.profile(data)
    np.testing.assert_allclose(np.sort(a.weights, 1), np.sort(b.weights, 1), atol=1e-5)
    same = np.mean([set(x) == set(y) for x, y in zip(a.clients.tolist(), b.clients.tolist())])
    assert same >= 0.99                                        # the rest: ties at the m-th place
    rebuilt = FacilityLocation.from_params(*cpu.params())
    assert not rebuilt.on_gpu                                  # use_gpu=False travels with the params


@pytest.fixture(scope="module")
def vllm_engine(warm, tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (the vllm extra)")
    from sponge.trainer.generators import VLLMConfig, VLLMGenerator

    _, tok, model, _ = warm
    return VLLMGenerator.from_model(model, tok, tmp_path_factory.mktemp("policy"),
                                    VLLMConfig(dtype="float32", enforce_eager=True, max_model_len=SHAPE.n_positions,
                                               gpu_memory_utilization=0.2))


def test_vllm_logprobs_are_the_trainers(warm, vllm_engine):
    _, tok, model, prompts = warm
    for temperature in (1.0, 0.7):
        gen = vllm_engine.generate(model, prompts, 8, temperature)
        assert gaps(model, tok, gen, temperature).mean() < 1e-3, temperature
    greedy = vllm_engine.generate(model, prompts, 8, 0.0)
    reference = TransformersGenerator(tok).generate(model, prompts, 8, 0.0)
    assert np.mean([a == b for a, b in zip(greedy.response_tokens, reference.response_tokens)]) >= 0.95
    assert vllm_engine.unsynced == []


def test_vllm_follows_the_trainers_updates(warm, vllm_engine):
    task, tok, model, prompts = warm
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, small(), generator=vllm_engine)
    assert trainer.recompute                                  # another engine's numerics: recomputed
    before = len(vllm_engine.sync_seconds)
    records = [trainer.step() for _ in range(3)]
    assert len(vllm_engine.sync_seconds) == before + 3 and all(math.isfinite(r["loss"]) for r in records)
    gen = vllm_engine.generate(trainer.policy, prompts, 8, 1.0)   # the updated weights, synced
    assert gaps(trainer.policy, tok, gen).mean() < 1e-3
