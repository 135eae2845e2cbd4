"""Policies: a tiny character-level GPT-2 built in code, a supervised warm start, local HF models,
and the one function every part of the trainer uses to score responses (`response_logprobs`).

No code here downloads anything: the tiny model comes from a `transformers` config, its tokenizer
is built from the task's alphabet, and `load_pretrained` only reads a local directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CharTokenizer",
    "HFTokenizer",
    "ResponseScores",
    "TinyModelConfig",
    "Tokenizer",
    "build_tiny_model",
    "export_hf",
    "load_pretrained",
    "pack",
    "resolve_device",
    "response_logprobs",
    "warm_start",
]


class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer."""

    pad_token_id: int
    eos_token_id: int

    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_response(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One token per character of `alphabet`, plus <pad>=0, <bos>=1, <eos>=2.

    A prompt is <bos> + characters; a response is characters + <eos>. `decode` stops at the
    first <eos> and drops special tokens.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"alphabet must be non-empty with distinct characters, got {alphabet!r}")
        self.alphabet = alphabet
        self._to_id = {c: i + 3 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 3

    def _ids(self, text: str) -> list[int]:
        try:
            return [self._to_id[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the alphabet {self.alphabet!r}") from None

    def encode_prompt(self, text: str) -> list[int]:
        return [self.bos_token_id] + self._ids(text)

    def encode_response(self, text: str) -> list[int]:
        return self._ids(text) + [self.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            if i == self.eos_token_id:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3])
        return "".join(out)

    def to_hf(self):
        """The same tokenizer as a Hugging Face `PreTrainedTokenizerFast` (same ids; a prompt gets
        <bos> as a special token): for libraries that need one (TRL), built offline."""
        from tokenizers import (
            Regex,
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
            processors,
        )
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **self._to_id}
        inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        inner.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
        inner.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>", unk_token="<pad>")


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the `Tokenizer` interface.

    `decode` stops at the first end-of-sequence token; `skip_special_tokens` (default True) says
    whether other special tokens are dropped from the text the reward sees (False keeps them, for
    rewards that look at tool-call or reasoning markers). Rewards on token ids need no decoding at
    all: override `Task.score`, which receives the token ids."""

    def __init__(self, hf_tokenizer, skip_special_tokens: bool = True):
        self.hf = hf_tokenizer
        self.skip_special_tokens = skip_special_tokens
        if hf_tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the trainer needs one to end responses")
        self.eos_token_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def encode_response(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"]) + [self.eos_token_id]

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.hf.decode(ids, skip_special_tokens=self.skip_special_tokens)


@dataclass
class TinyModelConfig:
    """Shape of the tiny policy."""

    #: "gpt2" (learned positions, GELU) or "llama" (rotary positions, RMSNorm, SwiGLU).
    arch: str = "gpt2"
    #: Transformer blocks.
    n_layer: int = 2
    #: Hidden width.
    n_embd: int = 64
    #: Attention heads (must divide n_embd).
    n_head: int = 4
    #: Longest prompt + response in tokens.
    n_positions: int = 32


def build_tiny_model(tokenizer: CharTokenizer, config: TinyModelConfig | None = None, seed: int = 0):
    """A randomly initialised GPT-2 (or Llama, `config.arch`) language model sized for `tokenizer`'s
    vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = config or TinyModelConfig()
    torch.manual_seed(seed)
    if config.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=config.n_embd, intermediate_size=2 * config.n_embd,
            num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
            num_key_value_heads=config.n_head, max_position_embeddings=config.n_positions,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True))
    if config.arch != "gpt2":
        raise ValueError(f"unknown tiny model arch {config.arch!r}; use 'gpt2' or 'llama'")
    hf_config = GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout would make log-probs stochastic
    )
    return GPT2LMHeadModel(hf_config)


def load_pretrained(path: str | Path):
    """(model, tokenizer) from a local Hugging Face directory; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a local directory")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model, HFTokenizer(tok)


def export_hf(model, tokenizer, directory: str | Path) -> Path:
    """Write `model` and its tokenizer as a Hugging Face model directory (config, safetensors
    weights, fast tokenizer), the form vLLM and `load_pretrained` read.

    The tiny model is built in code, so this is how vLLM gets it; a CharTokenizer is written as its
    `to_hf()` twin (the same ids), an HFTokenizer as the tokenizer it wraps."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    hf = tokenizer.to_hf() if hasattr(tokenizer, "to_hf") else getattr(tokenizer, "hf", tokenizer)
    hf.save_pretrained(directory)
    return directory


def resolve_device(name: str = "auto") -> torch.device:
    """`ReMixConfig.device` as a torch device: "auto" is the first CUDA device when torch sees
    one, else the CPU; asking for CUDA on a machine without it is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def pack(
    prompt_tokens: list[list[int]], response_tokens: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response ids for a forward pass.

    Returns (input_ids [B, L], attention_mask [B, L], gather_index [B, R], response_mask [B, R]):
    position `gather_index[i, j]` of the logits predicts response token j of row i.
    Right padding keeps position ids 0..n-1, the same as left-padded generation with
    position ids taken from the attention mask.
    """
    n = len(prompt_tokens)
    p_len = np.array([len(p) for p in prompt_tokens])
    r_len = np.array([len(r) for r in response_tokens])
    if (p_len == 0).any():
        raise ValueError("every prompt needs at least one token")
    total = p_len + r_len
    L, R = int(total.max()), max(int(r_len.max()), 1)
    ids = np.full((n, L), pad_token_id, dtype=np.int64)
    attn = np.zeros((n, L), dtype=np.int64)
    for i in range(n):  # one row copy per sequence; the sequences are ragged
        seq = list(prompt_tokens[i]) + list(response_tokens[i])
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
    j = np.arange(R)[None, :]
    resp_mask = j < r_len[:, None]
    gather = np.where(resp_mask, p_len[:, None] - 1 + j, 0)
    return (torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(gather),
            torch.from_numpy(resp_mask))


@dataclass
class ResponseScores:
    """Per-response-token scores, all [B, R] (R = longest response)."""

    logprobs: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor


def response_logprobs(
    model, prompt_tokens: list[list[int]], response_tokens: list[list[int]], pad_token_id: int,
    temperature: float = 1.0, with_entropy: bool = False,
) -> ResponseScores:
    """Log-probabilities (and optionally entropies) of each response token under `model`.

    Logits are divided by `temperature`, the same as in generation, so that the stored behaviour
    log-probs and these agree at equal weights. Gradients flow unless called under no_grad.
    """
    ids, attn, gather, mask = pack(prompt_tokens, response_tokens, pad_token_id)
    device = next(model.parameters()).device
    ids, attn, gather, mask = ids.to(device), attn.to(device), gather.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits
    picked = torch.gather(logits, 1, gather.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logp_all = F.log_softmax(picked.float() / temperature, dim=-1)
    targets = torch.gather(ids, 1, (gather + 1) * mask)  # masked slots gather position 0; ignored
    logp = torch.gather(logp_all, -1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else torch.zeros_like(logp)
    maskf = mask.to(logp.dtype)
    return ResponseScores(logp * maskf, entropy * maskf, maskf)


def warm_start(
    model, tokenizer: Tokenizer, task, steps: int = 150, batch_size: int = 64, lr: float = 3e-3,
    seed: int = 0, progress: bool = False,
) -> list[float]:
    """Short supervised training on correct answers, so the policy's rewards are not all zero.

    Returns the loss per step. Few steps on purpose: the point is a policy that succeeds
    sometimes, leaving room for RL to improve it.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="warm start", disable=not progress, leave=False):
        prompts, answers = task.sample(rng, batch_size)
        p_tok = [tokenizer.encode_prompt(p) for p in prompts]
        r_tok = [tokenizer.encode_response(a) for a in answers]
        scores = response_logprobs(model, p_tok, r_tok, tokenizer.pad_token_id)
        loss = -(scores.logprobs.sum() / scores.mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
