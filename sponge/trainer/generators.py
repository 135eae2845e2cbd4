"""Generators: sample responses and return, with each token, its log-probability under the policy
that sampled it (the behaviour log-probs every off-policy correction needs).

`TransformersGenerator` (default, CPU, used by the tests) runs a plain KV-cache sampling loop over
any `transformers` causal LM. `VLLMGenerator` (optional extra `sponge[vllm]`, GPU) is imported
lazily so nothing here needs vLLM installed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Generation", "Generator", "TransformersGenerator", "VLLMGenerator"]


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
    """

    def __init__(self, tokenizer, batch_size: int = 512):
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, model, prompt_tokens: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, seed: int | None = None) -> Generation:
        gen = torch.Generator(device="cpu")
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
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        logits, past, next_pos = out.logits[:, -1], _cache_of(out), pos[:, -1:] + 1

        tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
        logps = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            logp_all = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
            if temperature > 0:
                tok = torch.multinomial(logp_all.exp().cpu(), 1, generator=gen).squeeze(1).to(device)
            else:
                tok = logp_all.argmax(-1)
            tokens[:, t] = torch.where(done, torch.full_like(tok, pad), tok)
            logps[:, t] = torch.where(done, 0.0, logp_all.gather(1, tok[:, None]).squeeze(1))
            newly = (~done) & (tok == eos)
            lengths = torch.where(newly, t + 1, lengths)
            done |= newly
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=device)], dim=1)
            out = model(input_ids=tokens[:, t:t + 1], attention_mask=attn, position_ids=next_pos,
                        use_cache=True, **{cache_kw: past})
            logits, past, next_pos = out.logits[:, -1], _cache_of(out), next_pos + 1
        model.train(was_training)
        lengths, tokens, logps = lengths.cpu().numpy(), tokens.cpu().numpy(), logps.cpu().numpy()
        return ([tokens[i, : lengths[i]].tolist() for i in range(n)],
                [logps[i, : lengths[i]].astype(np.float32) for i in range(n)])


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class VLLMGenerator:
    """Generation with vLLM (GPU). Optional: `pip install sponge[vllm]`.

    vLLM serves its own copy of the weights; call `sync_weights(model)` after each update so the
    behaviour log-probs belong to the current policy version. vLLM reports log-probs of the raw
    (pre-temperature) distribution unless told otherwise, so this generator asks for processed
    log-probs where the installed vLLM supports it and otherwise samples at temperature 1.
    """

    def __init__(self, model_path: str, tokenizer, **llm_kwargs):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError("VLLMGenerator needs vLLM: pip install 'sponge[vllm]' on a GPU machine") from exc
        try:
            self.llm = LLM(model=model_path, logprobs_mode="processed_logprobs", **llm_kwargs)
            self._processed = True
        except TypeError:  # older vLLM: no logprobs_mode, log-probs are pre-temperature
            self.llm = LLM(model=model_path, **llm_kwargs)
            self._processed = False
        self.tokenizer = tokenizer

    def sync_weights(self, model) -> None:
        """Copy the trainer's current weights into the vLLM engine."""
        weights = [(k, v.detach()) for k, v in model.state_dict().items()]
        if hasattr(self.llm, "collective_rpc"):
            def _load(worker, weights=weights):
                worker.model_runner.model.load_weights(weights)
            self.llm.collective_rpc(_load)
        else:
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)

    def generate(self, model, prompt_tokens: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, seed: int | None = None) -> Generation:
        from vllm import SamplingParams

        if not self._processed and temperature not in (0, 1):
            raise ValueError("this vLLM reports pre-temperature log-probs; use temperature 1 (or 0)")
        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, logprobs=0,
                                seed=seed, stop_token_ids=[self.tokenizer.eos_token_id])
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_tokens], params, use_tqdm=False)
        toks, logps = [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            toks.append(ids)
            logps.append(np.array([lp[t].logprob for lp, t in zip(c.logprobs, ids)], dtype=np.float32))
        texts = [self.tokenizer.decode(t) for t in toks]
        return Generation([list(p) for p in prompt_tokens], toks, logps, texts)
