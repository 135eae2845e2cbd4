"""Generators: sample responses and return, with each token, its log-probability under the policy
that sampled it (the behaviour log-probs every off-policy correction needs).

`TransformersGenerator` (default; CPU or GPU, used by the tests) runs a plain KV-cache sampling loop
over any `transformers` causal LM, drawing tokens on the model's device. `VLLMGenerator` (optional
extra `sponge[vllm]`, GPU) drives an in-process vLLM engine and syncs the trainer's weights into it;
vLLM is imported lazily, so nothing here needs it installed. `sampling_kwargs` and `parse_outputs`
are its request building and output reading, plain functions (unit-tested without vLLM).
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Generation", "Generator", "TransformersGenerator", "VLLMConfig", "VLLMGenerator", "parse_outputs",
           "sample_categorical", "sampling_kwargs"]


@dataclass
class Generation:
    """One response per prompt, aligned lists."""

    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    #: Log-probability of each response token under the sampling distribution (float32 arrays).
    logprobs: list[np.ndarray]
    #: Decoded responses (text up to the first end-of-sequence token).
    responses: list[str]


class Generator(Protocol):
    """Samples one response per prompt token list."""

    def generate(self, model, prompt_tokens: list[list[int]], max_new_tokens: int,
                 temperature: float, seed: int | None = None) -> Generation: ...


class TransformersGenerator:
    """Batched sampling with a KV cache on whatever device `model` lives on.

    Prompts are left-padded; position ids come from the attention mask so a padded prompt sees
    the same positions as an unpadded one (and as the right-padded scoring in `models.pack`).
    `temperature=0` decodes greedily and records log-probs at temperature 1.

    Tokens are drawn on the model's device with a generator on that device (`sample_categorical`:
    multinomial's algorithm without its per-call host checks), so a CUDA run copies nothing to
    the host until a chunk is done; on the CPU the draws are the same as they always were for a
    given seed. `bf16` runs the forward passes under bf16
    autocast (the log-softmax stays float32). Whether every row has ended is asked every
    `stop_check_every` tokens (None: every token on the CPU, where asking is free; every 8 on a
    GPU, where each ask waits for the device).
    """

    def __init__(self, tokenizer, batch_size: int = 512, bf16: bool = False, stop_check_every: int | None = None):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.bf16 = bf16
        self.stop_check_every = stop_check_every

    @torch.no_grad()
    def generate(self, model, prompt_tokens: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, seed: int | None = None) -> Generation:
        device = next(model.parameters()).device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,))))
        out_tokens: list[list[int]] = []
        out_logp: list[np.ndarray] = []
        for start in range(0, len(prompt_tokens), self.batch_size):
            chunk = prompt_tokens[start : start + self.batch_size]
            toks, logps = self._generate_chunk(model, chunk, max_new_tokens, temperature, gen)
            out_tokens += toks
            out_logp += logps
        texts = [self.tokenizer.decode(t) for t in out_tokens]
        return Generation([list(p) for p in prompt_tokens], out_tokens, out_logp, texts)

    def _generate_chunk(self, model, prompts, max_new_tokens, temperature, gen):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        check_every = self.stop_check_every or (1 if device.type == "cpu" else 8)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, width), pad, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, width - len(p):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        # transformers >= 5.2x renamed the cache argument `past_key_values` -> `cache`.
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with autocast:
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        logits, past, next_pos = out.logits[:, -1], _cache_of(out), pos[:, -1:] + 1

        tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
        logps = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            logp_all = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
            if temperature > 0:
                tok = sample_categorical(logp_all.exp(), gen)
            else:
                tok = logp_all.argmax(-1)
            tokens[:, t] = torch.where(done, torch.full_like(tok, pad), tok)
            logps[:, t] = torch.where(done, 0.0, logp_all.gather(1, tok[:, None]).squeeze(1))
            newly = (~done) & (tok == eos)
            lengths = torch.where(newly, t + 1, lengths)
            done |= newly
            if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
                break
            attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=device)], dim=1)
            with autocast:
                out = model(input_ids=tokens[:, t:t + 1], attention_mask=attn, position_ids=next_pos,
                            use_cache=True, **{cache_kw: past})
            logits, past, next_pos = out.logits[:, -1], _cache_of(out), next_pos + 1
        model.train(was_training)
        lengths, tokens, logps = lengths.cpu().numpy(), tokens.cpu().numpy(), logps.cpu().numpy()
        return ([tokens[i, : lengths[i]].tolist() for i in range(n)],
                [logps[i, : lengths[i]].astype(np.float32) for i in range(n)])


def sample_categorical(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of `probs` [B, V]: argmax(p / q) with q ~ Exp(1), which is
    torch.multinomial's own algorithm for a single sample (the same draws and generator state for
    a seed) without its two validity checks, each of which copies a flag to the host: on a GPU
    those were two waits per generated token."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class VLLMConfig:
    """The vLLM engine `VLLMGenerator` starts (each knob is a `vllm.LLM` argument unless said)."""

    #: Weight and activation dtype inside vLLM. "auto" follows the model config (vLLM runs a
    #: float32 config in bfloat16); "float32" keeps its log-probs within ~1e-5 of a float32
    #: trainer's, "bfloat16" is its fast path (a ~1e-2 gap the off-policy correction absorbs).
    dtype: str = "auto"
    #: Share of the GPU's memory vLLM takes for weights and KV cache; the trainer shares the GPU.
    gpu_memory_utilization: float = 0.3
    #: Skip torch.compile and CUDA-graph capture: the engine starts in seconds instead of about a
    #: minute, and decodes slower. In-place weight syncs work either way (graphs keep addresses).
    enforce_eager: bool = False
    #: Longest prompt + response in tokens (None: the model config's).
    max_model_len: int | None = None
    #: The engine's seed: the sampling RNG of every request without a seed of its own.
    seed: int = 0
    #: Give request i the seed `seed + i` of each generate() call, so a call is reproducible
    #: whatever vLLM's batching; vLLM then samples the seeded rows one generator at a time (slower).
    per_request_seeds: bool = False
    #: (VLLMGenerator) Copy the policy's weights into the engine at every generate() call, so the
    #: behaviour log-probs always belong to the policy passed in. False: call sync_weights yourself.
    sync_on_generate: bool = True


def sampling_kwargs(n: int, max_new_tokens: int, temperature: float, eos_token_id: int,
                    seed: int | None = None, per_request_seeds: bool = False) -> list[dict]:
    """`SamplingParams` arguments for n prompts: one dict shared by all, or one per prompt when
    each request gets its own seed.

    The sampled token's log-prob only (`logprobs=0`, flat lists: no dict per token), stop at the
    end-of-sequence token (kept in the output, as the trainer scores it), no detokenisation (the
    trainer decodes with its own tokenizer), no top-k/top-p: the log-probs must be those of the
    distribution the trainer scores, log_softmax(logits / temperature) (the engine is started with
    logprobs_mode="processed_logprobs"; at temperature 0 they are taken at temperature 1).
    """
    base = {"temperature": float(temperature), "top_p": 1.0, "top_k": 0, "max_tokens": int(max_new_tokens),
            "logprobs": 0, "flat_logprobs": True, "stop_token_ids": [int(eos_token_id)],
            "detokenize": False, "skip_special_tokens": False}
    if per_request_seeds and seed is not None:
        return [{**base, "seed": int(seed) + i} for i in range(n)]
    return [base]


def parse_outputs(outputs, eos_token_id: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Response token ids and the sampled tokens' log-probs from `LLM.generate`'s RequestOutputs
    (one per prompt, in prompt order), cut after the first end-of-sequence token (kept).

    Reads both forms of vLLM's per-token log-probs: `FlatLogprobs` (flat lists with start/end
    indices per position; with logprobs=0 one entry per position, read as one array) and the
    list of {token_id: Logprob} dicts. A missing or misaligned log-prob is an error naming the
    request, never a silent zero."""
    tokens: list[list[int]] = []
    logps: list[np.ndarray] = []
    for r, out in enumerate(outputs):
        c = out.outputs[0]
        ids = [int(t) for t in c.token_ids]
        lp = c.logprobs
        if lp is None:
            raise ValueError(f"vLLM returned no log-probs for request {r} (SamplingParams.logprobs must be 0)")
        if len(lp) != len(ids):
            raise ValueError(f"vLLM returned {len(lp)} log-probs for the {len(ids)} tokens of request {r}")
        if hasattr(lp, "start_indices"):     # FlatLogprobs
            starts = np.asarray(lp.start_indices, dtype=np.int64)
            ends = np.asarray(lp.end_indices, dtype=np.int64)
            flat_ids = np.asarray(lp.token_ids, dtype=np.int64)
            flat_lp = np.asarray(lp.logprobs, dtype=np.float64)
            if len(ids) and bool(np.all(ends - starts == 1)) and np.array_equal(flat_ids[starts], ids):
                values = flat_lp[starts]
            else:                            # top-k entries too: find the sampled token's
                values = np.array([_sampled(flat_ids[a:b], flat_lp[a:b], t, r, i)
                                   for i, (a, b, t) in enumerate(zip(starts, ends, ids))], dtype=np.float64)
        else:
            values = np.array([_logprob_of(pos, t, r, i) for i, (pos, t) in enumerate(zip(lp, ids))],
                              dtype=np.float64)
        if eos_token_id in ids:
            cut = ids.index(eos_token_id) + 1
            ids, values = ids[:cut], values[:cut]
        if not np.all(np.isfinite(values)):
            raise ValueError(f"vLLM returned a non-finite log-prob for request {r}")
        tokens.append(ids)
        logps.append(values.astype(np.float32))
    return tokens, logps


def _sampled(flat_ids: np.ndarray, flat_lp: np.ndarray, token: int, request: int, position: int) -> float:
    hit = np.flatnonzero(flat_ids == token)
    if not len(hit):
        raise ValueError(f"vLLM's log-probs of request {request} lack the sampled token at position {position}")
    return float(flat_lp[hit[0]])


def _logprob_of(position_logprobs, token: int, request: int, position: int) -> float:
    if not position_logprobs or token not in position_logprobs:
        raise ValueError(f"vLLM's log-probs of request {request} lack the sampled token at position {position}")
    return float(position_logprobs[token].logprob)


def _load_weights(model, weights):
    """Runs inside vLLM's worker (this process): the engine's own loader maps Hugging Face names
    and layouts (fused qkv, GPT-2's Conv1D) onto its modules and copies in place."""
    loaded = model.load_weights(weights)
    names = {name for name, _ in model.named_parameters()}
    return sorted(names - set(loaded or ()))


class VLLMGenerator:
    """Generation with vLLM on a GPU (optional extra: `pip install sponge[vllm]`; written against
    vLLM 0.33's `LLM` API).

    Behaviour log-probs are the trainer's kind: the engine runs with
    `logprobs_mode="processed_logprobs"`, so each sampled token comes with log_softmax(logits / T)
    at the sampling temperature T (vLLM's default would be the raw, pre-temperature ones), and
    requests use no top-k/top-p. All prompts of a call go to the engine at once; it batches them.

    Weight sync: the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here
    unless the environment says otherwise) and `sync_weights` hands it the policy's state_dict
    through `LLM.apply_model`: vLLM's own `load_weights` copies each tensor in place, GPU to GPU,
    with no serialisation, files or process group. Chosen over vLLM's weight-transfer API (NCCL or
    CUDA-IPC engines, built for a trainer in another process) because trainer and engine share one
    process and one GPU here. Cost per sync: one device-to-device copy of the weights (the tiny
    model's ~0.1 MB: microseconds; 1 B parameters in bf16: ~1 ms at ~4 TB/s), per-tensor Python
    overhead (~tens of µs each), a prefix-cache reset (cached KV of old weights must not be
    reused) and one device synchronisation; `sync_seconds` records each. With
    `sync_on_generate` (default) every generate() call syncs first, so the trainer needs no hook
    and a rollback or a resumed checkpoint is picked up as well.

    `VLLMGenerator.from_model(policy, tokenizer, directory)` writes a model built in code (the
    tiny one) as a Hugging Face directory first, so vLLM can load it.
    """

    def __init__(self, model_path: str | Path, tokenizer, config: VLLMConfig | None = None, **llm_kwargs):
        self.config = config or VLLMConfig()
        self.tokenizer = tokenizer
        # The in-process engine is what lets sync_weights pass GPU tensors by reference.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError("VLLMGenerator needs vLLM: pip install 'sponge[vllm]' on a GPU machine") from exc
        cfg = self.config
        kwargs = {"model": str(model_path), "tokenizer": str(model_path), "dtype": cfg.dtype,
                  "gpu_memory_utilization": cfg.gpu_memory_utilization, "enforce_eager": cfg.enforce_eager,
                  "seed": cfg.seed, "logprobs_mode": "processed_logprobs", "enable_prefix_caching": False,
                  "generation_config": "vllm"}
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        self.sync_seconds: list[float] = []
        #: vLLM parameters the last sync's state_dict did not reach (should stay empty).
        self.unsynced: list[str] = []

    @classmethod
    def from_model(cls, model, tokenizer, directory: str | Path, config: VLLMConfig | None = None,
                   **llm_kwargs) -> VLLMGenerator:
        """Write `model` and `tokenizer` to `directory` (Hugging Face format) and start vLLM on it."""
        from .models import export_hf

        export_hf(model, tokenizer, directory)
        return cls(directory, tokenizer, config, **llm_kwargs)

    @torch.no_grad()
    def sync_weights(self, model) -> float:
        """Copy `model`'s current weights into the engine; returns the seconds it took."""
        started = time.perf_counter()
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        try:
            missing = self.llm.apply_model(functools.partial(_load_weights, weights=weights))
        except Exception as exc:
            raise RuntimeError(
                "VLLMGenerator.sync_weights needs vLLM's in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, "
                f"set before vLLM starts): {exc}") from exc
        self.unsynced = sorted(set().union(*map(set, missing))) if missing else []
        self.llm.reset_prefix_cache()
        if torch.cuda.is_available():
            torch.cuda.synchronize()   # the copies are done before the engine's next forward
        seconds = time.perf_counter() - started
        self.sync_seconds.append(seconds)
        return seconds

    def generate(self, model, prompt_tokens: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, seed: int | None = None) -> Generation:
        from vllm import SamplingParams

        if self.config.sync_on_generate and model is not None:
            self.sync_weights(model)
        eos = self.tokenizer.eos_token_id
        per_request = sampling_kwargs(len(prompt_tokens), max_new_tokens, temperature, eos, seed,
                                      self.config.per_request_seeds)
        known = getattr(SamplingParams, "__struct_fields__", None)   # an older vLLM lacks flat_logprobs
        params = [SamplingParams(**{k: v for k, v in kw.items() if known is None or k in known})
                  for kw in per_request]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_tokens],
                                 params if len(params) > 1 else params[0], use_tqdm=False)
        toks, logps = parse_outputs(outs, eos)
        texts = [self.tokenizer.decode(t) for t in toks]
        return Generation([list(p) for p in prompt_tokens], toks, logps, texts)
