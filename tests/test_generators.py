"""Generators on the CPU: TransformersGenerator's on-device draws give the CPU the same tokens as
before for a seed; VLLMGenerator's own logic (request building, output reading, log-prob
alignment, stop at EOS, weight sync) around an engine that cannot run here.

vLLM needs a CUDA GPU, so the engine itself is faked in the VLLMGenerator tests below, and only
the engine: the fake `vllm` module holds a SamplingParams that records its arguments and an LLM
whose `generate` samples with a real tiny model (TransformersGenerator) and returns vLLM 0.33's
output shapes (RequestOutput.outputs[0].token_ids / .logprobs as FlatLogprobs), and whose
`apply_model` runs the generator's weight loader on that model. The same generator against the
real engine is tests/test_gpu.py (marked gpu); `parse_outputs` was also checked against vLLM
0.33's own FlatLogprobs and Logprob classes when it was written.
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sponge.trainer import (
    CharTokenizer,
    TinyModelConfig,
    build_tiny_model,
    make_task,
    response_logprobs,
)
from sponge.trainer.generators import (
    TransformersGenerator,
    VLLMConfig,
    VLLMGenerator,
    _cache_of,
    parse_outputs,
    sample_categorical,
    sampling_kwargs,
)
from sponge.trainer.models import export_hf, load_pretrained

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    prompts, _ = task.sample(np.random.default_rng(0), 24)
    return task, tok, [tok.encode_prompt(p) for p in prompts]


# ----------------------------------------------------------------------------------------------
# TransformersGenerator: same seed, same tokens as the loop it replaced


@torch.no_grad()
def reference_generate(model, tokenizer, prompts, max_new_tokens, temperature, seed, batch_size):
    """The sampling loop as it was before tokens were drawn on the model's device (probabilities
    copied to the host and drawn there with a CPU generator), kept here as the reference."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    out_t, out_l = [], []
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n, width = len(chunk), max(len(p) for p in chunk)
        ids = torch.full((n, width), pad, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        logits, past, next_pos = out.logits[:, -1], _cache_of(out), pos[:, -1:] + 1
        tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long)
        logps = torch.zeros((n, max_new_tokens))
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        for t in range(max_new_tokens):
            logp_all = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
            if temperature > 0:
                tok = torch.multinomial(logp_all.exp().cpu(), 1, generator=gen).squeeze(1)
            else:
                tok = logp_all.argmax(-1)
            tokens[:, t] = torch.where(done, torch.full_like(tok, pad), tok)
            logps[:, t] = torch.where(done, 0.0, logp_all.gather(1, tok[:, None]).squeeze(1))
            newly = (~done) & (tok == eos)
            lengths = torch.where(newly, t + 1, lengths)
            done |= newly
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype)], dim=1)
            out = model(input_ids=tokens[:, t:t + 1], attention_mask=attn, position_ids=next_pos,
                        use_cache=True, **{cache_kw: past})
            logits, past, next_pos = out.logits[:, -1], _cache_of(out), next_pos + 1
        out_t += [tokens[i, :lengths[i]].tolist() for i in range(n)]
        out_l += [logps[i, :lengths[i]].numpy() for i in range(n)]
    return out_t, out_l


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_cpu_draws_are_unchanged_for_a_seed(setup, arch, temperature):
    _, tok, prompts = setup
    model = build_tiny_model(tok, TinyModelConfig(arch=arch), seed=1)
    got = TransformersGenerator(tok, batch_size=10).generate(model, prompts, 8, temperature, seed=77)
    want_t, want_l = reference_generate(model, tok, prompts, 8, temperature, 77, batch_size=10)
    assert got.response_tokens == want_t
    for a, b in zip(got.logprobs, want_l):
        np.testing.assert_array_equal(a, b)
    # a different seed draws differently (the seed is really used)
    if temperature > 0:
        other = TransformersGenerator(tok, batch_size=10).generate(model, prompts, 8, temperature, seed=78)
        assert other.response_tokens != got.response_tokens


def test_sample_categorical_is_multinomials_draw():
    probs = torch.softmax(torch.randn(200, 13) * 3, -1)
    for seed in range(5):
        a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        b = sample_categorical(probs, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
    counts = np.bincount(sample_categorical(probs[:1].expand(20000, -1), torch.Generator().manual_seed(0)).numpy(),
                         minlength=13)
    np.testing.assert_allclose(counts / 20000, probs[0].numpy(), atol=0.015)


def test_checking_for_the_end_less_often_changes_nothing(setup):
    _, tok, prompts = setup
    model = build_tiny_model(tok, seed=2)
    every = TransformersGenerator(tok, stop_check_every=1).generate(model, prompts, 8, 1.0, seed=5)
    rarely = TransformersGenerator(tok, stop_check_every=8).generate(model, prompts, 8, 1.0, seed=5)
    assert every.response_tokens == rarely.response_tokens
    assert all(np.array_equal(a, b) for a, b in zip(every.logprobs, rarely.logprobs))


def test_bf16_generation_on_cpu_stays_close_to_float32(setup):
    _, tok, prompts = setup
    model = build_tiny_model(tok, seed=3)
    g = TransformersGenerator(tok, bf16=True).generate(model, prompts, 8, 1.0, seed=9)
    scores = response_logprobs(model, g.prompt_tokens, g.response_tokens, tok.pad_token_id)
    for i, lp in enumerate(g.logprobs):
        assert np.all(np.isfinite(lp))
        assert np.abs(lp - scores.logprobs[i, :len(lp)].detach().numpy()).max() < 0.1   # bf16 rounding, not a bug


# ----------------------------------------------------------------------------------------------
# export_hf / load_pretrained: the directory vLLM and `--model` read


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_hf_round_trip(setup, tmp_path, arch):
    _, tok, prompts = setup
    model = build_tiny_model(tok, TinyModelConfig(arch=arch), seed=4)
    export_hf(model, tok, tmp_path / arch)
    loaded, hf_tok = load_pretrained(tmp_path / arch)
    for text in ["0123", "98765"]:
        assert hf_tok.encode_prompt(text) == tok.encode_prompt(text)
        assert hf_tok.encode_response(text) == tok.encode_response(text)
    assert hf_tok.eos_token_id == tok.eos_token_id and hf_tok.pad_token_id == tok.pad_token_id
    g = TransformersGenerator(tok).generate(model, prompts, 8, 1.0, seed=1)
    a = response_logprobs(model, g.prompt_tokens, g.response_tokens, tok.pad_token_id).logprobs
    b = response_logprobs(loaded, g.prompt_tokens, g.response_tokens, tok.pad_token_id).logprobs
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [hf_tok.decode(r) for r in g.response_tokens] == g.responses


# ----------------------------------------------------------------------------------------------
# VLLMGenerator's logic


def test_sampling_kwargs_ask_for_processed_sampled_logprobs():
    (shared,) = sampling_kwargs(5, 8, 0.7, eos_token_id=2)
    assert shared["logprobs"] == 0 and shared["temperature"] == 0.7 and shared["max_tokens"] == 8
    assert shared["stop_token_ids"] == [2] and shared["top_k"] == 0 and shared["top_p"] == 1.0
    assert "seed" not in shared                      # the engine's RNG: fast, unseeded rows
    seeded = sampling_kwargs(3, 8, 1.0, eos_token_id=2, seed=10, per_request_seeds=True)
    assert [kw["seed"] for kw in seeded] == [10, 11, 12]   # distinct: a GRPO group must differ
    (greedy,) = sampling_kwargs(2, 4, 0.0, eos_token_id=2, seed=3)
    assert greedy["temperature"] == 0.0


# vLLM 0.33's output shapes (vllm/outputs.py, vllm/logprobs.py), for the fake engine.
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: dict[int, Logprob]) -> None:
        self.start_indices.append(len(self.logprobs))
        for t, lp in position.items():
            self.token_ids.append(t)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(None)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)


def request_output(ids, values, flat=True, extra=None):
    positions = [{**({extra: Logprob(-0.01, 1)} if extra is not None else {}), t: Logprob(float(v), 1)}
                 for t, v in zip(ids, values)]
    if flat:
        lp = FlatLogprobs()
        for p in positions:
            lp.append(p)
    else:
        lp = positions
    completion = types.SimpleNamespace(index=0, text="", token_ids=list(ids), cumulative_logprob=None,
                                       logprobs=lp, finish_reason="stop", stop_reason=None)
    return types.SimpleNamespace(outputs=[completion])


@pytest.mark.parametrize("flat", [True, False])
def test_parse_outputs_aligns_logprobs_and_cuts_after_eos(flat):
    outs = [request_output([5, 6, 2], [-0.5, -1.0, -0.25], flat),
            request_output([7, 8, 9], [-0.1, -0.2, -0.3], flat),          # no EOS: hit max_tokens
            request_output([2], [-2.0], flat),                             # EOS at once
            request_output([3, 2, 4, 5], [-1, -2, -3, -4], flat)]          # past EOS (ignore_eos): cut
    tokens, logps = parse_outputs(outs, eos_token_id=2)
    assert tokens == [[5, 6, 2], [7, 8, 9], [2], [3, 2]]
    want = [[-0.5, -1.0, -0.25], [-0.1, -0.2, -0.3], [-2.0], [-1.0, -2.0]]
    for got, expected in zip(logps, want):
        np.testing.assert_array_equal(got, np.float32(expected))
    assert all(lp.dtype == np.float32 for lp in logps)


def test_parse_outputs_finds_the_sampled_token_among_top_k():
    tokens, logps = parse_outputs([request_output([5, 6], [-0.5, -0.75], extra=9)], eos_token_id=2)
    assert tokens == [[5, 6]] and logps[0].tolist() == [-0.5, -0.75]


def test_parse_outputs_refuses_missing_or_misaligned_logprobs():
    bad = request_output([5, 6], [-0.5, -0.75])
    bad.outputs[0].logprobs = None
    with pytest.raises(ValueError, match="no log-probs for request 0"):
        parse_outputs([bad], eos_token_id=2)
    short = request_output([5, 6, 7], [-0.5, -0.75, -1.0])
    short.outputs[0].token_ids = [5, 6, 7, 8]
    with pytest.raises(ValueError, match="3 log-probs for the 4 tokens of request 0"):
        parse_outputs([short], eos_token_id=2)
    wrong = request_output([5, 6], [-0.5, -0.75], flat=False)
    wrong.outputs[0].token_ids = [5, 7]
    with pytest.raises(ValueError, match="lack the sampled token at position 1"):
        parse_outputs([wrong], eos_token_id=2)
    inf = request_output([5], [-np.inf])
    with pytest.raises(ValueError, match="non-finite"):
        parse_outputs([inf], eos_token_id=2)


class EngineModel(torch.nn.Module):
    """The engine's copy of the weights, with vLLM's `load_weights(iterable of (name, tensor))`
    returning the names it loaded."""

    def __init__(self, hf_model):
        super().__init__()
        self.inner = hf_model

    def load_weights(self, weights):
        own = dict(self.inner.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name in own:
                own[name].data.copy_(tensor)
                loaded.add(f"inner.{name}")
        return loaded


def fake_vllm(tokenizer, engine_model, calls):
    """A stand-in `vllm` module (see the module docstring)."""

    class SamplingParams:
        __struct_fields__ = ("temperature", "top_p", "top_k", "max_tokens", "logprobs", "flat_logprobs",
                             "stop_token_ids", "detokenize", "skip_special_tokens", "seed")

        def __init__(self, **kw):
            assert set(kw) <= set(self.__struct_fields__), kw
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, **kw):
            calls["llm_kwargs"] = kw

        def apply_model(self, fn):
            return [fn(engine_model)]

        def reset_prefix_cache(self):
            calls["resets"] = calls.get("resets", 0) + 1
            return True

        def generate(self, prompts, params, use_tqdm=True):
            calls["generate"] = (prompts, params)
            sp = params if not isinstance(params, list) else params[0]
            g = TransformersGenerator(tokenizer).generate(engine_model.inner, [p["prompt_token_ids"] for p in prompts],
                                                          sp.max_tokens, sp.temperature, seed=0)
            return [request_output(t, lp) for t, lp in zip(g.response_tokens, g.logprobs)]

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_generator_around_a_fake_engine(setup, tmp_path, monkeypatch):
    _, tok, prompts = setup
    policy = build_tiny_model(tok, seed=5)
    engine_model = EngineModel(build_tiny_model(tok, seed=99))    # different weights until synced
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(tok, engine_model, calls))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    gen = VLLMGenerator.from_model(policy, tok, tmp_path / "policy", VLLMConfig(dtype="float32", enforce_eager=True))

    kw = calls["llm_kwargs"]
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["model"] == str(tmp_path / "policy")
    assert kw["dtype"] == "float32" and kw["enable_prefix_caching"] is False
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"    # in-process engine: syncs by reference
    assert (tmp_path / "policy" / "config.json").exists() and (tmp_path / "policy" / "tokenizer.json").exists()

    out = gen.generate(policy, prompts, 8, 1.0, seed=3)
    # synced before generating: the engine's weights are the policy's, so its log-probs are the trainer's
    for (name, a), b in zip(policy.named_parameters(), engine_model.inner.parameters()):
        assert torch.equal(a, b), name
    assert gen.unsynced == [] and len(gen.sync_seconds) == 1 and calls["resets"] == 1
    sent, params = calls["generate"]
    assert [p["prompt_token_ids"] for p in sent] == prompts      # all prompts in one call: vLLM batches them
    assert params.logprobs == 0 and params.stop_token_ids == [tok.eos_token_id]
    scores = response_logprobs(policy, out.prompt_tokens, out.response_tokens, tok.pad_token_id)
    for i, (r, lp) in enumerate(zip(out.response_tokens, out.logprobs)):
        assert len(r) == len(lp) >= 1 and (r[-1] == tok.eos_token_id or len(r) == 8)
        np.testing.assert_allclose(lp, scores.logprobs[i, :len(r)].detach().numpy(), atol=1e-5)
    assert out.responses == [tok.decode(r) for r in out.response_tokens]

    # an update to the policy reaches the engine at the next call
    with torch.no_grad():
        next(policy.parameters()).add_(0.5)
    gen.generate(policy, prompts[:2], 8, 0.0)
    assert torch.equal(next(policy.parameters()), next(engine_model.inner.parameters()))
    assert len(gen.sync_seconds) == 2

    # per-request seeds: one SamplingParams per prompt, distinct seeds
    gen.config.per_request_seeds = True
    gen.generate(policy, prompts[:3], 8, 1.0, seed=40)
    assert [p.seed for p in calls["generate"][1]] == [40, 41, 42]


def test_vllm_generator_reports_parameters_a_sync_missed(setup, tmp_path, monkeypatch):
    _, tok, _ = setup
    policy = build_tiny_model(tok, seed=5)
    engine_model = EngineModel(copy.deepcopy(policy))
    engine_model.extra = torch.nn.Parameter(torch.zeros(2))     # a parameter no policy name maps to
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(tok, engine_model, {}))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    gen = VLLMGenerator(tmp_path, tok)
    gen.sync_weights(policy)
    assert gen.unsynced == ["extra"]
