"""A TorchRL replay buffer over sponge replay sources (sponge.integrations.torchrl): real TorchRL, an
in-process pool and the service."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

pytest.importorskip("torchrl", reason="the TorchRL integration needs the `torchrl` extra: pip install 'sponge[torchrl]'")

from tensordict import TensorDict
from torchrl.data import TensorDictReplayBuffer

from sponge.contract import ReplaySource
from sponge.integrations.torchrl import (
    GroupSampler,
    ReplaySourceStorage,
    make_replay_buffer,
    rollouts_to_tensordict,
    tensordict_to_rollouts,
)
from sponge.trainer import CharTokenizer, TinyModelConfig, build_tiny_model
from sponge.trainer.models import response_logprobs
from sponge.trainer.replay import FIFOReplayPool

torch.set_num_threads(1)

GROUP = 4


def rollouts(n_groups: int, seed: int, version: int | None = None, flat_groups: int = 1) -> TensorDict:
    """n_groups GRPO groups of GROUP rollouts as a TorchRL collector would hand them over: padded token
    ids with masks, behaviour log-probs, rewards; the last `flat_groups` groups have equal rewards."""
    g = torch.Generator().manual_seed(seed)
    n = n_groups * GROUP
    prompt_len = torch.randint(2, 6, (n_groups,), generator=g).repeat_interleave(GROUP)
    response_len = torch.randint(1, 7, (n,), generator=g)
    prompts = torch.randint(3, 14, (n_groups, 6), generator=g).repeat_interleave(GROUP, 0)
    prompt_mask = torch.arange(6)[None] < prompt_len[:, None]
    response_mask = torch.arange(7)[None] < response_len[:, None]
    reward = torch.rand(n, generator=g)
    reward[n - flat_groups * GROUP:] = 0.5
    data = {"prompt_tokens": prompts * prompt_mask, "prompt_mask": prompt_mask,
            "response_tokens": torch.randint(3, 14, (n, 7), generator=g) * response_mask,
            "response_mask": response_mask,
            "behavior_logprobs": -torch.rand(n, 7, generator=g) * response_mask, "reward": reward,
            "group": torch.arange(n_groups).repeat_interleave(GROUP)}
    if version is not None:
        data["policy_version"] = torch.full((n,), version)
    return TensorDict(data, batch_size=[n])


def whole_groups(sample: TensorDict, table) -> None:
    """Every group in the sample is there with all the rows its candidates hold."""
    codes = sample["group"].numpy()
    held = np.bincount(rollouts_to_tensordict(table)["group"].numpy())
    for code in np.unique(codes):
        assert (codes == code).sum() % held[code] == 0


def test_a_torchrl_buffer_writes_to_a_pool_and_samples_its_curated_groups():
    pool = FIFOReplayPool(window=2)
    assert isinstance(pool, ReplaySource)
    rb = make_replay_buffer(pool, run_id="rl", fingerprint="fp", batch_size=8)
    assert isinstance(rb, TensorDictReplayBuffer) and rb.storage.version == 0

    rb.extend(rollouts(4, seed=0))                    # version 0 (the storage's)
    assert rb.writer.sent == 16
    assert len(rb) == 0                               # nothing older than version 0 to replay yet
    rb.storage.set_version(1)
    assert pool.version == 1
    assert len(rb) == 12                              # the group with equal rewards is never a candidate
    sample = rb.sample()
    assert sample.shape[0] >= 8 and set(sample.keys()) >= {"prompt_tokens", "response_tokens", "response_mask",
                                                             "behavior_logprobs", "advantage", "reward", "index"}
    whole_groups(sample, rb.storage.table)
    assert (sample["policy_version"] == 0).all()
    picked = rb.storage.table.take(sample["index"].numpy())
    assert set(pc.unique(picked.column("run_id")).to_pylist()) == {"rl"}
    # Advantages are GRPO's within each whole group: they sum to ~0 per group.
    sums = np.bincount(sample["group"].numpy(), weights=sample["advantage"].numpy())
    assert np.abs(sums).max() < 1e-4 * GROUP

    rb.extend(rollouts(2, seed=1, flat_groups=0))     # version 1
    rb.storage.set_version(3)                         # window 2: versions 1 and 2 may be replayed
    assert set(rb.storage.table.column("policy_version").to_pylist()) == {1}
    assert len(rb) == 8


def test_a_scored_sample_carries_density_ratio_weights():
    pool = FIFOReplayPool(window=2)
    model = build_tiny_model(CharTokenizer("0123456789>"), TinyModelConfig(arch="llama"), seed=0).eval()

    @torch.no_grad()
    def score(prompt_tokens, response_tokens):
        s = response_logprobs(model, prompt_tokens, response_tokens, pad_token_id=0)
        return s.logprobs, s.mask

    rb = make_replay_buffer(pool, run_id="rl", fingerprint="fp", batch_size=8, score=score, mode="weight")
    rb.extend(rollouts(4, seed=2, flat_groups=0))
    rb.storage.set_version(1)
    sample = rb.sample()
    assert "weight" in sample and "logp_current" in sample
    assert torch.isfinite(sample["weight"]).all() and (sample["weight"] > 0).all()
    assert sample["weight"].mean().item() == pytest.approx(1.0, abs=1e-5)     # self-normalised
    rows = rb.storage.table.take(sample["index"].numpy())
    again = score(rows.column("prompt_tokens").to_pylist(), rows.column("response_tokens").to_pylist())[0]
    torch.testing.assert_close(sample["logp_current"][:, : again.shape[1]], again)
    assert 0 < rb.sampler.last_stats["ess_truncated"] <= 1


def test_state_dict_restores_the_source_and_the_sampler():
    rb = make_replay_buffer(FIFOReplayPool(window=2), run_id="rl", fingerprint="fp", batch_size=8, seed=3)
    rb.extend(rollouts(3, seed=4))
    rb.storage.set_version(1)
    state = rb.state_dict()
    first = rb.sample()

    restored = make_replay_buffer(FIFOReplayPool(window=2), run_id="rl", fingerprint="fp", batch_size=8)
    restored.load_state_dict(state)
    assert restored.storage.version == 1
    assert restored.storage.table.column("rollout_id").to_pylist() == rb.storage.table.column("rollout_id").to_pylist()
    second = restored.sample()                        # the sampler's generator came back too
    assert torch.equal(first["index"], second["index"])


def test_the_storage_is_read_only_and_versions_only_go_up():
    storage = ReplaySourceStorage(FIFOReplayPool(), version=2)
    with pytest.raises(TypeError, match="read-only"):
        storage.set(0, rollouts(1, seed=0))
    with pytest.raises(ValueError, match="only go up"):
        storage.set_version(1)
    with pytest.raises(TypeError, match="ReplaySource"):
        ReplaySourceStorage(object())
    empty = TensorDictReplayBuffer(storage=ReplaySourceStorage(FIFOReplayPool()), sampler=GroupSampler(),
                                   batch_size=4, collate_fn=ReplaySourceStorage.collate)
    with pytest.raises(RuntimeError, match="no candidates"):
        empty.sample()


def test_records_round_trip_through_the_tensordict_layout():
    data = rollouts(2, seed=5, version=7)
    table = tensordict_to_rollouts(data, run_id="rl")
    assert table.column("policy_version").to_pylist() == [7] * 8
    back = rollouts_to_tensordict(table)
    for key in ("prompt_mask", "response_mask", "reward"):
        torch.testing.assert_close(back[key], data[key][:, : back[key].shape[1]] if back[key].ndim > 1 else data[key])
    torch.testing.assert_close(back["behavior_logprobs"], data["behavior_logprobs"][:, : back["response_mask"].shape[1]])


@pytest.fixture
def service(broker, topic, tmp_path):
    """`sponge serve` in a thread on the test's topic."""

    from sponge.service.api import ApiConfig
    from sponge.service.curation import CurationConfig
    from sponge.service.server import ServerConfig, serve_in_thread
    from sponge.service.ingest import IngestConfig

    config = ServerConfig(
        ingest=IngestConfig(bootstrap_servers=broker, topic=topic, group_id=f"g-{topic}",
                            store_path=str(tmp_path / "store"), flush_interval_s=0.2, session_timeout_ms=6000,
                            create_topics=False, log_level="WARNING"),
        curation=CurationConfig(k=8, n_references=32, snapshot_interval_s=0.0, batch_wait_s=0.2),
        api=ApiConfig(port=0))
    with serve_in_thread(config) as server:
        yield server


def test_a_torchrl_buffer_over_the_service(service, broker, topic):
    from sponge.client import ServiceReplaySource

    source = ServiceReplaySource(service.http.url, bootstrap_servers=broker, topic=topic, window=2, wait_s=60)
    rb = make_replay_buffer(source, run_id="torchrl-service", fingerprint="fp", batch_size=8)
    rb.extend(rollouts(4, seed=6))                    # → Kafka → the service's store and selector
    rb.storage.set_version(1)
    sample = rb.sample()                              # waits until the service holds what was sent
    assert source.incomplete_draws == 0
    whole_groups(sample, rb.storage.table)
    picked = rb.storage.table.take(sample["index"].numpy())
    assert set(picked.column("run_id").to_pylist()) == {"torchrl-service"}
    assert set(picked.column("policy_version").to_pylist()) == {0}
    source.close()
