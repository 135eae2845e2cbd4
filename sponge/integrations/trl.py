"""TRL's GRPOTrainer on sponge's replay loop: every generated group is published to a replay source,
and curated replay from that source is mixed into each training batch with sponge's corrections.

    from sponge.integrations.trl import SpongeGRPOTrainer, SpongeReplayConfig
    trainer = SpongeGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                                replay=source, sponge_config=SpongeReplayConfig(replay_fraction=0.25))
    trainer.train()

`source` is any `sponge.contract.ReplaySource`: an in-process pool of `sponge.trainer.replay`, or the
service (`sponge.client.ServiceReplaySource`). TRL keeps its config, generation, rewards, loss for
fresh rows and logging; the subclass adds five things at TRL's own seams:

1. `register(run_id, tokenizer fingerprint)` when built; the policy version is the source's version
   plus the optimizer steps taken since (`report_version` after every optimizer step).
2. Publishing (`_generate_and_score_completions`): every fresh rollout becomes a record (prompt and
   completion token ids, reward, version, run_id, prompt_id naming its group) with the behaviour
   policy's per-token log-probs at the sampling temperature. Where they come from, cheapest first:
   TRL's own `old_per_token_logps` when TRL computes them (vLLM, or generation not aligned with
   optimizer steps: free); otherwise captured from the first loss forward of each row, which in that
   case runs under the same weights that generated it (TRL relies on the same fact to skip
   `old_per_token_logps`): free too. Rows whose completion mask TRL zeroed (truncated completions
   with `mask_truncated_completions`), or not yet seen by a loss forward when the optimizer is about
   to step, are scored with one extra no-grad forward over just those rows.
3. Replay: groups drawn from `candidates(version, unit="group")` by `sponge.trainer.replay.ReplaySampler`
   (truncated density ratios π_k/π_behaviour: drawn ∝ w̃, or weighted by w̃ self-normalised) are
   appended to the batch, p/(1−p) replayed rows per generated row, plus, with `dynamic_sampling`,
   as many as replace the fresh groups without learning signal (all rewards equal).
4. Loss (`_compute_loss`): fresh rows go through TRL's own loss unchanged; replayed rows through
   Mix-PPG (ReMix): r = π_θ/π_behaviour clipped to [c − ε, c + ε_high] around c = π_k/π_behaviour,
   times their draw weight (or the decoupled form, PPO on π_θ/π_k times a per-token correction of
   π_k/π_behaviour), normalised the way TRL's `loss_type` normalises, so the sum is one loss.
5. Metrics in TRL's log under `sponge/` (replay rows, ESS, clipped mass, staleness, published rows).

Not supported yet (a clear error at construction): tool calling and environments (tool-result tokens
need a mask the rollout record lacks) and vision-language models.
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

try:
    from transformers import TrainerCallback
    from trl import GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("sponge.integrations.trl needs TRL >= 1.16: pip install 'sponge[trl]'") from exc

from sponge.contract import ReplaySource, tokenizer_fingerprint
from sponge.trainer.density_ratio import correction_weights, token_log_ratios
from sponge.trainer.losses import decoupled_ppo_loss, kl_k3, mix_ppg_loss
from sponge.trainer.replay import ReplaySampler, padded_list_column, rollouts_table

__all__ = ["SpongeGRPOTrainer", "SpongeReplayConfig"]

#: Keys of TRL's batch dict this trainer knows how to extend with replayed rows.
_KNOWN_KEYS = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
               "num_items_in_batch", "old_per_token_logps", "sampling_per_token_logps",
               "importance_sampling_ratio", "ref_per_token_logps"}
_CHECKPOINT_FILE = "sponge_replay.pt"


@dataclass
class SpongeReplayConfig:
    """Every knob of the TRL integration (TRL's own knobs stay in its GRPOConfig)."""

    #: Name of this run in the source (`run_id` of every rollout). None = GRPOConfig.run_name, else
    #: the output directory's name. Resuming under the same name continues its policy versions.
    run_id: str | None = None
    #: Publish every generated rollout to the source.
    publish: bool = True
    #: Mix replay into training batches (False = only publish).
    replay: bool = True
    #: p: share of replayed rows in a batch: p/(1 − p) replayed rows are added per generated row
    #: (0.25 adds a third; ReMix uses 0.4). Rounded down to whole micro-batch rows.
    replay_fraction: float = 0.25
    #: Drop the fresh groups whose rewards are all equal (no GRPO signal: zero advantages) from the
    #: update and fill their rows with replayed groups (dynamic sampling without generating more).
    #: They are still published.
    dynamic_sampling: bool = True
    #: Draw replay as whole groups ("group") or single rollouts ("rollout").
    replay_unit: str = "group"
    #: How the truncated density ratio w̃ = min(π_k/π_behaviour, C) enters: "weight" (uniform draw,
    #: w̃ self-normalised to mean 1 as a loss weight), "resample" (draw ∝ w̃, weight 1; scores every
    #: candidate) or "uniform" (no ratio in the draw; the loss's clip centre still corrects).
    replay_sampling: str = "weight"
    #: "geometric" (per-token mean of log ratios: length-normalised, the sane choice for LLM-length
    #: responses) or "sequence" (exact product, explodes with length).
    ratio_mode: str = "geometric"
    #: Fixed truncation C of w; None = GLOW-like schedule clip(γ·K, cap_min, cap_max), K = versions.
    ratio_cap: float | None = None
    #: γ of the truncation schedule.
    ratio_cap_gamma: float = 1.0
    #: Smallest truncation of the schedule.
    ratio_cap_min: float = 2.0
    #: Largest truncation of the schedule.
    ratio_cap_max: float = 10.0
    #: Draw probability factor decay^(staleness − 1); 1 = uniform over what the source offers.
    recency_decay: float = 1.0
    #: Policy loss of replayed rows: "mix_ppg" (ReMix: clip(π_θ/π_b, c − ε, c + ε_high), c = π_k/π_b)
    #: or "decoupled" (PPO clip of π_θ/π_k, times the per-token `correction` of π_k/π_b).
    policy_loss: str = "mix_ppg"
    #: Per-token correction of π_k/π_b for "decoupled": "tis", "seq_tis", "mis", "icepop",
    #: "geo_mask" or "none" (sponge.trainer.density_ratio.CORRECTIONS).
    correction: str = "tis"
    #: Lower bound of the correction (truncation floor, or mask below).
    correction_low: float = 0.0
    #: Upper bound of the correction (truncation cap, or mask above).
    correction_high: float = 2.0
    #: Rollouts that could not be sent are kept and retried at every later send; past this many
    #: training stops with an error instead of dropping them.
    max_unsent_rows: int = 100_000
    #: Seed of the replay draws (plus the process index).
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.replay_fraction < 1, "replay_fraction must be in [0, 1)"),
            (self.replay_unit in ("group", "rollout"), "replay_unit must be 'group' or 'rollout'"),
            (self.replay_sampling in ("weight", "resample", "uniform"),
             "replay_sampling must be 'weight', 'resample' or 'uniform'"),
            (self.ratio_mode in ("geometric", "sequence"), "ratio_mode must be 'geometric' or 'sequence'"),
            (self.policy_loss in ("mix_ppg", "decoupled"), "policy_loss must be 'mix_ppg' or 'decoupled'"),
            (self.correction in ("none", "tis", "seq_tis", "mis", "icepop", "geo_mask"),
             "correction must be one of none, tis, seq_tis, mis, icepop, geo_mask"),
            (0 <= self.correction_low < 1 < self.correction_high, "need 0 <= correction_low < 1 < correction_high"),
            (0 < self.recency_decay <= 1, "recency_decay must be in (0, 1]"),
            (self.max_unsent_rows > 0, "max_unsent_rows must be > 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("invalid SpongeReplayConfig: " + "; ".join(bad))


# ---------------------------------------------------------------------------------------------------
# Plain helpers (tensors in, tensors out)


def _pad_rows(rows: list[list[int]], value: float, side: str, width: int, dtype=torch.long) -> torch.Tensor:
    """Ragged rows as a [n, width] tensor padded on `side` ("left" or "right")."""
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):  # ragged; one slice copy per row
        if len(r):
            if side == "left":
                out[i, width - len(r):] = torch.as_tensor(r, dtype=dtype)
            else:
                out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def _widen(t: torch.Tensor, width: int, side: str, value: float = 0) -> torch.Tensor:
    """Pad the last dimension of a [n, w] tensor to `width` on `side`."""
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = (extra, 0) if side == "left" else (0, extra)
    return torch.nn.functional.pad(t, pad, value=value)


def _take_rows(batch: dict[str, Any], index: torch.Tensor, n: int) -> dict[str, Any]:
    """The rows `index` of every per-row tensor of a TRL batch dict; scalars and None kept."""
    return {k: (v[index] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v)
            for k, v in batch.items()}


def _round_up(x: int, multiple: int | None) -> int:
    return x if not multiple else -(-x // multiple) * multiple


def _prompt_ids(prompt_tokens: list[list[int]], group: np.ndarray) -> list[str]:
    """A stable prompt_id per row: a hash of the group's prompt token ids, suffixed "#k" when the same
    prompt forms more than one group in one batch (its groups must stay apart)."""
    first = np.unique(group, return_index=True)[1]
    names, seen = {}, {}
    for g, i in zip(group[first], first):
        h = hashlib.sha1(np.asarray(prompt_tokens[i], dtype=np.int64).tobytes()).hexdigest()[:16]
        k = seen.get(h, 0)
        seen[h] = k + 1
        names[int(g)] = h if k == 0 else f"{h}#{k}"
    return [names[int(g)] for g in group]


def _no_signal_rows(rewards: np.ndarray, group: np.ndarray) -> np.ndarray:
    """bool per row: the scorable rewards of its group are all equal (no GRPO signal). NaN rewards
    (unscorable rows, which TRL leaves out of the baseline) are ignored."""
    _, inverse = np.unique(group, return_inverse=True)
    size = int(inverse.max()) + 1 if inverse.size else 0
    lo, hi = np.full(size, np.inf), np.full(size, -np.inf)
    np.fmin.at(lo, inverse, rewards)
    np.fmax.at(hi, inverse, rewards)
    return ~(hi > lo)[inverse]


@dataclass
class _Pending:
    """Fresh rollouts of one generation, waiting for their behaviour log-probs before publishing."""

    base: int                               # sponge_row id of row 0
    table_args: dict                        # rollouts_table keyword arguments but behavior_logprobs
    lengths: np.ndarray                     # completion length per row
    logp: np.ndarray                        # [n, max length] behaviour log-probs as they arrive
    have: np.ndarray                        # bool per row: log-probs known
    sendable: np.ndarray                    # bool per row: reward is finite (unscorable rows are not sent)

    def fill(self, rows: np.ndarray, logp: np.ndarray) -> None:
        width = min(self.logp.shape[1], logp.shape[1])
        self.logp[rows, :width] = logp[:, :width]
        self.have[rows] = True

    def table(self) -> pa.Table:
        rows = np.flatnonzero(self.sendable)
        args = {k: ([v[i] for i in rows] if isinstance(v, list) else v[rows] if isinstance(v, np.ndarray) else v)
                for k, v in self.table_args.items()}
        logps = [self.logp[i, : self.lengths[i]] for i in rows]
        return rollouts_table(**args, behavior_logprobs=logps)


class _SpongeCallback(TrainerCallback):
    """Publishes the pending rollouts before each optimizer step and reports the version after it."""

    def __init__(self, trainer: SpongeGRPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._sponge_train_begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._sponge_flush()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._sponge_report_version()

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._sponge_flush()
        self.trainer._sponge_send_backlog(final=True)


# ---------------------------------------------------------------------------------------------------
# The trainer


class SpongeGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer publishing to, and replaying from, a `sponge.contract.ReplaySource`.

    Takes every argument of `trl.GRPOTrainer`, plus `replay` (the source) and `sponge_config`.
    `sponge_version` is the policy version the trainer generates with now.

    TRL's loss options (the surrogate of sapo/cispo/vespo, the entropy bonus, the top-entropy and
    off-policy masks, sequence-level ratios) shape the fresh rows' loss; replayed rows always use
    `policy_loss` with TRL's ε/ε_high, its β·KL to the reference and its `loss_type` normalisation.
    With row- or token-weighted loss types the fresh part (entropy bonus included) weighs by its
    share of the micro-batch. Single process tested; each process publishes and draws its own rows.
    """

    def __init__(self, *args, replay: ReplaySource, sponge_config: SpongeReplayConfig | None = None, **kwargs):
        if not isinstance(replay, ReplaySource):
            raise TypeError(f"replay must implement sponge.contract.ReplaySource, got a {type(replay).__name__}")
        super().__init__(*args, **kwargs)
        if self.tools or self.environment_factories is not None:
            raise ValueError("sponge replay does not support tool calling or environments yet: tool-result tokens "
                             "need a loss mask the rollout record lacks")
        if self._is_vlm:
            raise ValueError("sponge replay supports text-only models (the rollout record holds no images)")
        self.replay_source = replay
        self.sponge_config = cfg = sponge_config or SpongeReplayConfig()
        self.sponge_run_id = cfg.run_id or self.args.run_name or Path(self.args.output_dir).name
        self.sponge_sampler = ReplaySampler(cfg.replay_sampling, cfg.ratio_mode, cfg.ratio_cap, cfg.ratio_cap_gamma,
                                            cfg.ratio_cap_min, cfg.ratio_cap_max, cfg.recency_decay)
        self._sponge_rng = np.random.default_rng(cfg.seed + self.accelerator.process_index)
        self._sponge_fingerprint = tokenizer_fingerprint(self._tokenizer)
        self._sponge_registered = int(replay.register(self.sponge_run_id, self._sponge_fingerprint))
        self._sponge_offset = self._sponge_registered     # version = offset + optimizer steps
        self._sponge_reported: int | None = None
        self._sponge_pending: list[_Pending] = []
        self._sponge_backlog: list[pa.Table] = []         # tables a send failed on, retried in order
        self._sponge_next_row = 0
        self._sponge_generations = 0
        self._sponge_nonce = uuid.uuid4().hex[:8]
        self._sponge_capture = None
        self._sponge_last: dict[str, Any] = {}
        self.sponge_published = 0                         # rollouts handed to the source so far
        self.add_callback(_SpongeCallback(self))
        self._sponge_check_positions()

    @torch.no_grad()
    def _sponge_check_positions(self) -> None:
        """Warn when the model's log-probs change with left padding: TRL left-pads prompts and passes
        no position ids, so a model with absolute positions (GPT-2) scores a row differently in every
        batch shape, and behaviour log-probs, ratios and clip centres inherit that noise. Rotary
        models (Llama, Qwen, ...) are unaffected."""
        vocab = self.model.config.get_text_config().vocab_size
        ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]], device=self.accelerator.device)
        padded = torch.cat([torch.full_like(ids[:, :2], self._tokenizer.pad_token_id), ids], dim=1)
        mask = torch.cat([torch.zeros_like(ids[:, :2]), torch.ones_like(ids)], dim=1)
        was_training = self.model.training
        self.model.eval()
        try:
            plain = self._get_per_token_logps_and_entropies(self.model, ids, torch.ones_like(ids), 2)[0]
            shifted = self._get_per_token_logps_and_entropies(self.model, padded, mask, 2)[0]
        finally:
            self.model.train(was_training)
        if not torch.allclose(plain.float(), shifted.float(), atol=1e-3):
            warnings.warn("sponge: this model's log-probs change with left padding (absolute position embeddings, "
                          "e.g. GPT-2); TRL left-pads without position ids, so behaviour log-probs and replay "
                          "ratios will be noisy. Prefer a rotary-position model.", stacklevel=3)

    # -- versions ----------------------------------------------------------------------------
    @property
    def sponge_version(self) -> int:
        """The policy version generating now: the source's version at registration (or the resumed
        checkpoint's step, whichever is later) plus the optimizer steps since."""
        return self._sponge_offset + self.state.global_step

    def _sponge_train_begin(self, global_step: int) -> None:
        # Resuming a TRL checkpoint at step s: versions continue from max(source's version, s), so they
        # only go up even when the source saw versions after the checkpoint was written.
        self._sponge_offset = max(self._sponge_registered - global_step, 0)
        self._sponge_report_version()

    def _sponge_report_version(self) -> None:
        version = self.sponge_version
        if version == self._sponge_reported:
            return
        try:
            self.replay_source.report_version(version)
            self._sponge_reported = version
        except Exception as exc:  # noqa: BLE001 - a source that is down must not stop training; retried
            self._sponge_metric("sponge/source_errors", 1.0)
            warnings.warn(f"sponge: report_version({version}) failed, retrying after the next step: {exc}",
                          stacklevel=2)

    # -- TRL seams: remember what generation produced --------------------------------------------
    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        self._sponge_last = {"prompt_ids": result[0], "completion_ids": result[1]}
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._sponge_last["rewards_per_func"] = rewards_per_func
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                         *args, **kwargs)
        capture, self._sponge_capture = self._sponge_capture, None
        if capture is not None:          # armed by _compute_loss for its policy forward only
            capture(out[0].detach())
        return out

    # -- generation: publish, then mix replay in ---------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        cfg = self.sponge_config
        if not self.model.training or not (cfg.publish or cfg.replay):
            return out
        unknown = [k for k, v in out.items() if k not in _KNOWN_KEYS and v is not None]
        if unknown:
            raise ValueError(f"sponge replay cannot extend TRL's batch keys {unknown} to replayed rows")
        n = out["completion_ids"].shape[0]
        group = self._sponge_groups(n)
        rows = torch.arange(self._sponge_next_row, self._sponge_next_row + n, device=out["advantages"].device)
        rewards = self._sponge_local_rewards(n)
        if cfg.publish:
            self._sponge_track(inputs, out, group, rewards)
        self._sponge_next_row += n
        self._sponge_generations += 1
        out["sponge_row"] = rows
        if cfg.replay:
            out = self._sponge_mix(out, group, rewards)
        return out

    def _sponge_local_rewards(self, n: int) -> np.ndarray:
        """This process's rows' rewards as TRL logs them: weighted sum over reward functions, NaN
        where every function returned None."""
        rpf = self._sponge_last["rewards_per_func"]
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        start = self.accelerator.process_index * n
        return rewards[start: start + n].float().cpu().numpy()

    def _sponge_groups(self, n: int) -> np.ndarray:
        # TRL groups consecutive runs of num_generations rows of the gathered batch.
        start = self.accelerator.process_index * n
        return (start + np.arange(n)) // self.num_generations

    def _sponge_track(self, inputs: list[dict], out: dict, group: np.ndarray, rewards: np.ndarray) -> None:
        """Queue this generation's rollouts for publishing; publish at once if their behaviour
        log-probs are already known."""
        prompt_tokens = [list(map(int, p)) for p in self._sponge_last["prompt_ids"]]
        completion_tokens = [list(map(int, c)) for c in self._sponge_last["completion_ids"]]
        n = len(completion_tokens)
        version = self.sponge_version
        # Unique across restarts of a run too (the store keeps one rollout per id).
        tag = f"{self.sponge_run_id}/v{version}/{self._sponge_nonce}/g{self._sponge_generations}"
        texts = [x["prompt"] if isinstance(x.get("prompt"), str) else None for x in inputs]
        prompts = [t if t is not None else self._tokenizer.decode(p) for t, p in zip(texts, prompt_tokens)]
        lengths = np.array([len(c) for c in completion_tokens], dtype=np.int64)
        pending = _Pending(
            base=self._sponge_next_row,
            table_args={
                "rollout_ids": [f"{tag}/p{self.accelerator.process_index}/{i}" for i in range(n)],
                "prompt_ids": _prompt_ids(prompt_tokens, group), "prompts": prompts,
                "responses": self._tokenizer.batch_decode(completion_tokens, skip_special_tokens=True),
                "prompt_tokens": prompt_tokens, "response_tokens": completion_tokens, "rewards": rewards,
                "policy_version": version, "run_id": self.sponge_run_id},
            lengths=lengths, logp=np.zeros((n, max(int(lengths.max(initial=0)), 1)), np.float32),
            have=np.zeros(n, dtype=bool), sendable=np.isfinite(rewards))
        unscorable = int((~pending.sendable).sum())
        if unscorable:
            self._sponge_metric("sponge/unscorable_not_published", float(unscorable))
        if out.get("old_per_token_logps") is not None:
            # TRL scored the batch with the generating weights already (vLLM, or unaligned steps).
            pending.fill(np.arange(n), out["old_per_token_logps"].float().cpu().numpy())
        else:
            # Rows whose completion mask TRL zeroed are scored by no loss forward: score them now.
            masked = np.flatnonzero(out["completion_mask"].sum(1).cpu().numpy() < lengths)
            if masked.size:
                logp, _ = self._sponge_score([prompt_tokens[i] for i in masked],
                                             [completion_tokens[i] for i in masked])
                pending.fill(masked, logp.float().cpu().numpy())
        self._sponge_pending.append(pending)
        if pending.have.all():
            self._sponge_flush()

    def _sponge_capture_logps(self, rows: torch.Tensor, logp: torch.Tensor) -> None:
        rows_np, logp_np = rows.cpu().numpy(), None
        for p in self._sponge_pending:
            local = rows_np - p.base
            sel = (local >= 0) & (local < len(p.have))
            if not sel.any():
                continue
            sel &= ~p.have[np.clip(local, 0, len(p.have) - 1)]
            if sel.any():
                logp_np = logp.float().cpu().numpy() if logp_np is None else logp_np
                p.fill(local[sel], logp_np[sel])

    def _sponge_flush(self) -> None:
        """Publish every pending generation; rows whose log-probs no loss forward captured are scored
        now (called before the optimizer step, so the weights are still those that generated them)."""
        if not self._sponge_pending:
            return
        for p in self._sponge_pending:
            missing = np.flatnonzero(~p.have & p.sendable)
            if missing.size:
                self._sponge_metric("sponge/extra_scored_rows", float(missing.size))
                logp, _ = self._sponge_score([p.table_args["prompt_tokens"][i] for i in missing],
                                             [p.table_args["response_tokens"][i] for i in missing])
                p.fill(missing, logp.float().cpu().numpy())
            self._sponge_backlog.append(p.table())
        self._sponge_pending = []
        self._sponge_send_backlog()

    def _sponge_send_backlog(self, final: bool = False) -> None:
        while self._sponge_backlog:
            table = self._sponge_backlog[0]
            try:
                if table.num_rows:
                    self.replay_source.send(table)
            except Exception as exc:
                self._sponge_metric("sponge/source_errors", 1.0)
                unsent = sum(t.num_rows for t in self._sponge_backlog)
                if final:
                    path = Path(self.args.output_dir) / "sponge_unsent.arrow"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tables = self._sponge_backlog
                    with pa.ipc.new_file(str(path), tables[0].schema) as w:
                        for t in tables:
                            w.write_table(t.select(tables[0].schema.names))
                    warnings.warn(f"sponge: {unsent} rollouts could not be sent ({exc}); kept in {path}",
                                  stacklevel=2)
                    return
                if unsent > self.sponge_config.max_unsent_rows:
                    raise RuntimeError(f"sponge: {unsent} rollouts could not be sent to the replay source "
                                       f"(over max_unsent_rows={self.sponge_config.max_unsent_rows}): {exc}") from exc
                warnings.warn(f"sponge: send failed, {unsent} rollouts kept for retry: {exc}", stacklevel=2)
                return
            self._sponge_backlog.pop(0)
            self.sponge_published += table.num_rows
            self._sponge_metric("sponge/published_rows", float(table.num_rows))

    # -- replay ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _sponge_score(self, prompt_tokens: list[list[int]], response_tokens: list[list[int]]):
        """(log π_current [B, T], mask [B, T]) of each response token, with TRL's own forward (fused
        head, sampling temperature), left-padded prompts and right-padded responses as TRL pads."""
        width_p = _round_up(max(len(p) for p in prompt_tokens), self.pad_to_multiple_of)
        width_c = _round_up(max(max((len(r) for r in response_tokens), default=1), 1), self.pad_to_multiple_of)
        pad = self._tokenizer.pad_token_id
        device = self.accelerator.device
        ids = torch.cat([_pad_rows(prompt_tokens, pad, "left", width_p),
                         _pad_rows(response_tokens, pad, "right", width_c)], dim=1).to(device)
        ones_p = [[1] * len(p) for p in prompt_tokens]
        ones_c = [[1] * len(r) for r in response_tokens]
        mask_c = _pad_rows(ones_c, 0, "right", width_c).to(device)
        attn = torch.cat([_pad_rows(ones_p, 0, "left", width_p).to(device), mask_c], dim=1)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logp, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, attn, width_c, batch_size=self.args.per_device_train_batch_size)
        mask = mask_c.to(logp.dtype)
        return logp * mask, mask

    @torch.no_grad()
    def _sponge_ref_logps(self, ids: torch.Tensor, attn: torch.Tensor, width: int) -> torch.Tensor:
        """log π_ref of replayed rows, the way TRL scores its reference for fresh rows."""
        bs = self.args.per_device_train_batch_size
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, ids, attn, width, batch_size=bs)[0]
        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, ids, attn, width, batch_size=bs)[0]

    def _sponge_candidates(self, version: int) -> pa.Table | None:
        try:
            return self.replay_source.candidates(version, unit="group")
        except Exception as exc:  # noqa: BLE001 - no replay this batch rather than no training
            self._sponge_metric("sponge/source_errors", 1.0)
            warnings.warn(f"sponge: candidates({version}) failed, this batch trains without replay: {exc}",
                          stacklevel=2)
            return None

    def _sponge_mix(self, out: dict, group: np.ndarray, rewards: np.ndarray) -> dict:
        """Append replayed rows (and drop fresh no-signal groups they replace) to TRL's batch dict."""
        cfg = self.sponge_config
        n = out["completion_ids"].shape[0]
        spg = self.args.steps_per_generation
        no_signal = _no_signal_rows(rewards, group) if cfg.dynamic_sampling else np.zeros(n, bool)
        n_add = round(cfg.replay_fraction / (1 - cfg.replay_fraction) * n)
        n_fill = int(no_signal.sum())
        self._sponge_metric("sponge/no_signal_rows", float(n_fill))
        if n_add + n_fill == 0:
            return out
        version = self.sponge_version
        candidates = self._sponge_candidates(version)
        self._sponge_metric("sponge/candidates", float(0 if candidates is None else candidates.num_rows))
        if candidates is None or candidates.num_rows == 0:
            self._sponge_metric("sponge/replay_rows", 0.0)
            return out
        draw = self.sponge_sampler.draw(candidates, n_add + n_fill, self._sponge_score, version, self._sponge_rng,
                                        unit=cfg.replay_unit)
        # Replayed rows first take the place of no-signal fresh rows, then add whole micro-batch rows
        # (the batch is split into steps_per_generation equal micro-batches).
        fill = min(n_fill, draw.table.num_rows)
        add = (draw.table.num_rows - fill) // spg * spg
        take = fill + add
        self._sponge_metric("sponge/replay_rows", float(take))
        self._sponge_metric("sponge/filled_no_signal_rows", float(fill))
        for key in ("ess_raw", "ess_truncated", "clipped_mass", "clip_fraction", "mean_staleness", "cap"):
            self._sponge_metric(f"sponge/{key}", float(draw.stats[key]))
        if take == 0:
            return out
        keep = torch.from_numpy(np.setdiff1d(np.arange(n), np.flatnonzero(no_signal)[:fill]))
        keep = keep.to(out["advantages"].device)
        fresh = _take_rows(out, keep, n) if fill else dict(out)
        return self._sponge_concat(fresh, draw.table.slice(0, take), draw.logp_current[:take],
                                   draw.weights[:take], draw.advantages[:take])

    def _sponge_concat(self, fresh: dict, table: pa.Table, logp_k: torch.Tensor, weights: np.ndarray,
                       advantages: np.ndarray) -> dict:
        device = fresh["advantages"].device
        pad = self._tokenizer.pad_token_id
        prompt_tokens = table.column("prompt_tokens").to_pylist()
        response_tokens = table.column("response_tokens").to_pylist()
        r = len(response_tokens)
        width_p = _round_up(max(fresh["prompt_ids"].shape[1], max(len(p) for p in prompt_tokens)),
                            self.pad_to_multiple_of)
        width_c = _round_up(max(fresh["completion_ids"].shape[1], max(len(c) for c in response_tokens)),
                            self.pad_to_multiple_of)
        behavior = torch.from_numpy(padded_list_column(table.column("behavior_logprobs"), 0.0, width_c)[0])
        replay = {
            "prompt_ids": _pad_rows(prompt_tokens, pad, "left", width_p),
            "prompt_mask": _pad_rows([[1] * len(p) for p in prompt_tokens], 0, "left", width_p),
            "completion_ids": _pad_rows(response_tokens, pad, "right", width_c),
            "completion_mask": _pad_rows([[1] * len(c) for c in response_tokens], 0, "right", width_c),
            "advantages": torch.from_numpy(np.asarray(advantages, np.float32)),
            "sponge_logp_behavior": behavior,
            "sponge_logp_current": _widen(logp_k.float().cpu(), width_c, "right")[:, :width_c],
            "sponge_weight": torch.from_numpy(np.asarray(weights, np.float32)),
            "sponge_row": torch.full((r,), -1, dtype=torch.long),
        }
        # What TRL's loss reads for fresh rows, given its meaning for replayed ones (their own loss
        # ignores it; the shapes must agree to shuffle and split the batch).
        if fresh.get("old_per_token_logps") is not None:
            replay["old_per_token_logps"] = replay["sponge_logp_current"]
        if fresh.get("sampling_per_token_logps") is not None:
            replay["sampling_per_token_logps"] = behavior
        if fresh.get("importance_sampling_ratio") is not None:
            shape = fresh["importance_sampling_ratio"].shape[1]
            replay["importance_sampling_ratio"] = torch.ones(r, width_c if shape != 1 else 1)
        replay = {k: v.to(device) for k, v in replay.items()}
        if self.beta != 0.0:
            ids = torch.cat([replay["prompt_ids"], replay["completion_ids"]], dim=1)
            attn = torch.cat([replay["prompt_mask"], replay["completion_mask"]], dim=1)
            replay["ref_per_token_logps"] = self._sponge_ref_logps(ids, attn, width_c)

        n_fresh = fresh["completion_ids"].shape[0]
        per_token = {"completion_ids": pad, "completion_mask": 0, "old_per_token_logps": 0.0,
                     "sampling_per_token_logps": 0.0, "ref_per_token_logps": 0.0}
        merged = {}
        for key, value in fresh.items():
            if key == "num_items_in_batch" or value is None:
                merged[key] = value
            elif key in ("prompt_ids", "prompt_mask"):
                merged[key] = torch.cat([_widen(value, width_p, "left", pad if key == "prompt_ids" else 0),
                                         replay[key]])
            elif key in per_token or (key == "importance_sampling_ratio" and value.shape[1] != 1):
                merged[key] = torch.cat([_widen(value, width_c, "right", per_token.get(key, 1.0)), replay[key]])
            else:
                merged[key] = torch.cat([value, replay[key].to(value.dtype)])
        zeros = torch.zeros(n_fresh, width_c, device=device)
        merged["sponge_logp_behavior"] = torch.cat([zeros, replay["sponge_logp_behavior"]])
        merged["sponge_logp_current"] = torch.cat([zeros, replay["sponge_logp_current"]])
        merged["sponge_weight"] = torch.cat([torch.ones(n_fresh, device=device), replay["sponge_weight"]])
        # The token count TRL's "dapo"-style losses divide by covers the replayed tokens too.
        merged["num_items_in_batch"] = self.accelerator.gather(merged["completion_mask"].sum()).sum()
        return merged

    # -- the loss -------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        rows = inputs.get("sponge_row")
        if rows is None:                       # evaluation, or sponge off
            return super()._compute_loss(model, inputs)
        n = rows.shape[0]
        is_replay = rows < 0
        core = {k: v for k, v in inputs.items() if not k.startswith("sponge_")}
        fresh_index = torch.nonzero(~is_replay).squeeze(1)
        replay_index = torch.nonzero(is_replay).squeeze(1)
        loss_fresh, n_fresh, tokens_fresh = None, fresh_index.numel(), 0.0
        if n_fresh:
            fresh = _take_rows(core, fresh_index, n) if replay_index.numel() else core
            tokens_fresh = fresh["completion_mask"].sum()
            if self.sponge_config.publish and self._sponge_pending:
                fresh_rows = rows[fresh_index]
                self._sponge_capture = lambda logp: self._sponge_capture_logps(fresh_rows, logp)
            try:
                loss_fresh = super()._compute_loss(model, fresh)
            finally:
                self._sponge_capture = None
        if not replay_index.numel():
            return loss_fresh
        return self._sponge_replay_loss(model, _take_rows(inputs, replay_index, n), loss_fresh, n_fresh,
                                        tokens_fresh, inputs["num_items_in_batch"])

    def _sponge_replay_loss(self, model, batch: dict, loss_fresh, n_fresh: int, tokens_fresh, num_items):
        cfg = self.sponge_config
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].shape[1]
        logp, _, _ = self._get_per_token_logps_and_entropies(model, ids, attn, width)
        mask = batch["completion_mask"].to(logp.dtype)
        behavior, current = batch["sponge_logp_behavior"] * mask, batch["sponge_logp_current"] * mask
        adv = batch["advantages"]
        if cfg.policy_loss == "mix_ppg":
            per_token = mix_ppg_loss(logp, behavior, current, adv, mask, self.epsilon_low, self.epsilon_high)
            ratio, centre = torch.exp(logp.detach() - behavior), torch.exp(current - behavior)
            clipped = ((ratio < centre - self.epsilon_low) | (ratio > centre + self.epsilon_high)).float()
        else:
            log_ratio = token_log_ratios(current, behavior, mask)
            w = correction_weights(cfg.correction, log_ratio, mask, cfg.correction_low, cfg.correction_high)
            per_token = decoupled_ppo_loss(logp, current, w, adv, mask, self.epsilon_low, self.epsilon_high)
            ratio = torch.exp(logp.detach() - current)
            clipped = ((ratio < 1 - self.epsilon_low) | (ratio > 1 + self.epsilon_high)).float()
        per_token = per_token * batch["sponge_weight"][:, None]
        if self.beta != 0.0:
            per_token = per_token + self.beta * kl_k3(logp, batch["ref_per_token_logps"], mask)
        per_token = per_token * mask
        tokens = mask.sum()
        self._sponge_metric("sponge/replay_clip_ratio", float((clipped * mask).sum() / tokens.clamp(min=1)))
        loss, row_share = self._sponge_normalise(per_token, mask, num_items)
        if loss_fresh is None:
            return loss
        if row_share is None:                   # sum-type losses: both parts share one denominator
            return loss_fresh + loss
        n_replay = mask.shape[0]
        if row_share == "tokens":
            total = tokens_fresh + tokens
            return (tokens_fresh * loss_fresh + tokens * loss) / total.clamp(min=1)
        return (n_fresh * loss_fresh + n_replay * loss) / (n_fresh + n_replay)

    def _sponge_normalise(self, per_token: torch.Tensor, mask: torch.Tensor, num_items):
        """The replayed rows' loss normalised as TRL's `loss_type` normalises a batch, and how it
        combines with the fresh rows' loss: by rows, by tokens, or (None) summed."""
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        lt = self.loss_type
        if lt in ("dapo", "cispo", "vespo"):
            normalizer = num_items.clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return per_token.sum() / normalizer, None
        if lt == "bnpo":
            return per_token.sum() / mask.sum().clamp(min=1.0) / accumulation, "tokens"
        if lt == "dr_grpo":
            return per_token.sum() / (per_token.shape[0] * self.max_completion_length) / accumulation, "rows"
        if lt == "luspo":
            return per_token.sum(-1).mean() / accumulation, "rows"
        # grpo, sapo: mean over rows of each row's token mean
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation, "rows"

    # -- logging and checkpoints ------------------------------------------------------------------
    def _sponge_metric(self, name: str, value: float) -> None:
        if not math.isnan(value):
            self._metrics["train"][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            self._metrics["train"]["sponge/version"] = [float(self.sponge_version)]
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        state = {"source": self.replay_source.state_dict(), "registered": self._sponge_registered,
                 "published": self.sponge_published, "generations": self._sponge_generations,
                 "backlog": [_to_bytes(t) for t in self._sponge_backlog]}
        torch.save(state, os.path.join(folder, _CHECKPOINT_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, _CHECKPOINT_FILE)
        if path is None or not os.path.exists(path):
            return
        state = torch.load(path, weights_only=False)
        self.replay_source.load_state_dict(state["source"])
        self._sponge_registered = max(self._sponge_registered, int(state["registered"]))
        self.sponge_published, self._sponge_generations = state["published"], state["generations"]
        self._sponge_backlog = [pa.ipc.open_stream(b).read_all() for b in state["backlog"]] + self._sponge_backlog


def _to_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
