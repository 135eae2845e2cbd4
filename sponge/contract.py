"""The replay contract: what every replay source does, whoever the trainer is.

One small protocol that sponge's own trainer, the TRL and TorchRL adapters and any user trainer talk
to, and that every source implements (the in-process pools in `sponge.trainer.replay` and the service
client `sponge.client.ServiceReplaySource`):

    version = source.register(run_id, fingerprint)   # start or resume a run; its version (0 when new)
    source.send(rollouts)                            # fresh rollouts (record schema, run_id set)
    source.report_version(version)                   # the trainer now generates with `version`
    table = source.candidates(version, unit="group") # what may be replayed now (CANDIDATE_COLUMNS)
    source.clear()                                   # replay off from here (policy reincarnation)
    state = source.state_dict(); source.load_state_dict(state)   # checkpoint / restore

The source decides *what* may be replayed (its window, its curation); the trainer decides *how much*
and with which correction (density ratios need the current policy, which only the trainer has).

A candidate table has the columns of `CANDIDATE_COLUMNS`: the trainer↔store columns of
`REPLAY_COLUMNS`, a `group_id` naming the group (one prompt answered by one policy version of one
run) and the `advantage` of each rollout computed within its whole group
(`sponge.groups.group_advantages`). Groups whose rewards are all equal carry no learning signal and
are never candidates. With `unit="group"` every group is whole (all its stored rollouts); with
`unit="rollout"` rows may come alone. A source may add more columns; one has a fixed meaning:
`draw_weight` (DRAW_WEIGHT), a multiplier of the row's draw probability by which a curating source
says what it prefers (a missing column means 1 for every row). It is not an importance weight:
the trainer's density ratios correct for off-policyness on top of it.

`clear()` forgets what is held (policy reincarnation: replay starts again from what is sent next);
the source keeps accepting `send`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Protocol, runtime_checkable

import pyarrow as pa

__all__ = ["CANDIDATE_COLUMNS", "DRAW_WEIGHT", "REPLAY_COLUMNS", "ReplaySource", "Unit", "tokenizer_fingerprint"]

#: Columns the trainer and the store exchange for every replayable rollout (the one list of them).
REPLAY_COLUMNS: tuple[str, ...] = (
    "rollout_id", "run_id", "prompt_id", "prompt", "response", "prompt_tokens", "response_tokens",
    "behavior_logprobs", "reward", "policy_version",
)

#: Columns of every candidate table a source returns.
CANDIDATE_COLUMNS: tuple[str, ...] = REPLAY_COLUMNS + ("group_id", "advantage")

#: An optional candidate column: how much more likely the source wants the row drawn (default 1).
DRAW_WEIGHT = "draw_weight"

Unit = Literal["group", "rollout"]


@runtime_checkable
class ReplaySource(Protocol):
    """Where replay comes from. Every method is required; see the module docstring for the order."""

    def register(self, run_id: str, fingerprint: str) -> int:
        """Start run `run_id` (or resume it); returns the policy version to continue from (0 when new).

        `fingerprint` names the tokenizer/model the rollouts' token ids belong to: rows of another
        run or another fingerprint are never candidates."""

    def send(self, rollouts: pa.Table) -> None:
        """Offer freshly generated rollouts (record schema, `run_id` of this run)."""

    def report_version(self, version: int) -> None:
        """The trainer now generates with `version`; versions only go up."""

    def candidates(self, version: int, unit: Unit = "group") -> pa.Table:
        """Rollouts that may be replayed by a trainer at `version` (older versions only), as an Arrow
        table with CANDIDATE_COLUMNS; empty when there are none (or after `clear`)."""

    def clear(self) -> None:
        """Forget what is held: later candidates come only from rollouts sent after this call."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume this source."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def tokenizer_fingerprint(tokenizer: Any, model_name: str = "") -> str:
    """A short stable name for the token ids a tokenizer produces (and, optionally, the model):
    sha256 over the sorted vocabulary. Works for Hugging Face tokenizers (`get_vocab`), sponge's
    `HFTokenizer` (its `.hf`) and `CharTokenizer` (its alphabet)."""
    inner = getattr(tokenizer, "hf", tokenizer)
    if hasattr(inner, "get_vocab"):
        vocab = sorted(inner.get_vocab().items())
    elif hasattr(inner, "alphabet"):
        vocab = [("alphabet", inner.alphabet)]
    else:
        raise TypeError(f"cannot fingerprint a {type(inner).__name__}: it has no get_vocab() or alphabet")
    special = [getattr(tokenizer, name, None) for name in ("pad_token_id", "eos_token_id", "bos_token_id")]
    body = json.dumps([model_name, special, vocab], separators=(",", ":"), default=str).encode()
    return hashlib.sha256(body).hexdigest()[:16]
