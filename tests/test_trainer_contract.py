"""The trainer side of the replay contract: every in-process pool is a `sponge.contract.ReplaySource`,
serves whole signal groups of its own run, restores from its state_dict; group draws; the
off-policy corrections against hand-computed numbers."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from sponge.contract import CANDIDATE_COLUMNS, ReplaySource
from sponge.trainer import (
    CuratedReplayPool,
    DiverseReplayPool,
    FIFOReplayPool,
    RandomReplayPool,
    draw_groups,
    rollouts_table,
)
from sponge.trainer import density_ratio as D

torch.set_num_threads(1)


def groups_table(version, n_groups=6, group=4, run_id="run", seed=0, successes=None):
    """n_groups groups of `group` rollouts; group g has successes[g] right answers (default g % 5)."""
    rng = np.random.default_rng(seed + 1000 * version)
    successes = [g % 5 for g in range(n_groups)] if successes is None else successes
    digits = rng.integers(0, 10, size=(n_groups, 4))
    prompts = ["".join(map(str, d)) + ">" for d in digits for _ in range(group)]
    rewards = np.concatenate([(np.arange(group) < min(k, group)).astype(float) for k in successes])
    n = n_groups * group
    return rollouts_table(
        rollout_ids=[f"{run_id}-v{version}-{i}" for i in range(n)], prompt_ids=[f"p{i // group}" for i in range(n)],
        prompts=prompts, responses=[p[::-1][1:] if r else "0" for p, r in zip(prompts, rewards)],
        prompt_tokens=[[1, 3 + i % 7] for i in range(n)], response_tokens=[[3 + i % 5, 2] for i in range(n)],
        behavior_logprobs=[np.array([-0.5, -0.1], np.float32)] * n, rewards=rewards, policy_version=version,
        run_id=run_id)


POOLS = {
    "fifo": lambda: FIFOReplayPool(window=2),
    "random": lambda: RandomReplayPool(window=2, capacity=3, seed=0),
    "curated": lambda: CuratedReplayPool(window=2, capacity=3, seed=0),
    "diverse": lambda: DiverseReplayPool(window=2, capacity=6),
}


@pytest.mark.parametrize("kind", sorted(POOLS))
def test_every_pool_is_a_replay_source_serving_whole_signal_groups(kind):
    pool = POOLS[kind]()
    assert isinstance(pool, ReplaySource)
    assert pool.register("run", "fp") == 0
    for v in range(3):
        pool.send(groups_table(v))
        pool.send(groups_table(v, run_id="other"))       # another run's rows are never candidates
        pool.report_version(v + 1)
    cands = pool.candidates(3, unit="group")
    assert cands.num_rows > 0 and set(CANDIDATE_COLUMNS) <= set(cands.column_names)
    assert set(cands.column("run_id").to_pylist()) == {"run"}
    assert set(cands.column("policy_version").to_pylist()) <= {1, 2}
    gid, counts = np.unique(cands.column("group_id").to_numpy(zero_copy_only=False), return_counts=True)
    assert (counts == 4).all()                            # whole groups
    rewards = cands.column("reward").to_numpy()
    for g in gid:                                          # every served group has signal
        r = rewards[cands.column("group_id").to_numpy(zero_copy_only=False) == g]
        assert r.max() > r.min()
    assert not any(g.startswith(("p0@", "p5@")) for g in gid)   # 0 and 5 successes of 4: no signal
    adv = cands.column("advantage").to_numpy()
    assert np.abs(adv).max() > 0 and not np.isnan(adv).any()

    again = POOLS[kind]()
    again.load_state_dict(pool.state_dict())
    assert again.version == 3 and again.register("run", "fp") == 3      # resuming continues from its version
    assert again.candidates(3).num_rows > 0
    assert again.register("run", "another tokenizer") == 0 and again.candidates(3).num_rows == 0
    pool.clear()
    assert pool.candidates(3).num_rows == 0


def test_random_and_curated_pools_cap_groups_and_curated_weights_staleness():
    for pool in (RandomReplayPool(window=3, capacity=4, seed=1), CuratedReplayPool(window=3, capacity=4, seed=1)):
        pool.register("run", "fp")
        for v in range(3):
            pool.send(groups_table(v, n_groups=8))
            pool.report_version(v + 1)
        cands = pool.candidates(3)
        assert 0 < len(pc.unique(cands.column("group_id"))) <= 4
    staleness = 3 - cands.column("policy_version").to_numpy()
    assert cands.column("draw_weight").to_numpy() == pytest.approx(0.7 ** (staleness - 1))


def test_curated_pool_prefers_groups_with_more_learning_signal():
    pool = CuratedReplayPool(window=2, capacity=2, quality_weight=50.0, seed=0)
    pool.register("run", "fp")
    # group std for 0/1 rewards: 1 of 8 right → 0.33, 4 of 8 → 0.5
    pool.send(groups_table(0, n_groups=6, group=8, successes=[1, 4, 1, 4, 1, 1]))
    pool.report_version(1)
    chosen = set(pool.candidates(1).column("prompt_id").to_pylist())
    assert chosen == {"p1", "p3"}


def test_draw_groups_keeps_groups_whole_and_draws_proportionally():
    codes = np.repeat(np.arange(4), [2, 3, 1, 2])
    rng = np.random.default_rng(0)
    rows = draw_groups(codes, np.array([1.0, 1.0, 1.0, 1.0]), 5, rng)
    drawn = codes[rows]
    assert len(rows) >= 5 and all((drawn == g).sum() in (0, np.bincount(codes)[g]) for g in range(4))
    firsts = [codes[draw_groups(codes, np.array([6.0, 3.0, 1.0, 0.0]), 1, rng)[0]] for _ in range(4000)]
    freq = np.bincount(firsts, minlength=4) / 4000
    assert freq == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.03)
    assert len(draw_groups(codes, np.ones(4), 20, rng)) >= 20         # a small pool repeats
    assert len(draw_groups(codes, np.ones(4), 0, rng)) == 0


# ------------------------------------------------------------------------------- corrections

def _lr(*rows):
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def test_corrections_hand_computed():
    # two rows, token ratios w: row 0 = [0.5, 4.0], row 1 = [1.5, 1.2]; row 1's second token is padding
    log_ratio = _lr([0.5, 4.0], [1.5, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    tis = D.truncated_is(log_ratio, mask, 0.0, 2.0)
    assert tis.flatten().tolist() == pytest.approx([0.5, 2.0, 1.5, 0.0])
    tis_low = D.truncated_is(log_ratio, mask, 0.8, 2.0)
    assert tis_low.flatten().tolist() == pytest.approx([0.8, 2.0, 1.5, 0.0])
    seq = D.sequence_truncated_is(log_ratio, mask, 0.0, 1.8)         # sequence ratios 2.0, 1.5
    assert seq.flatten().tolist() == pytest.approx([1.8, 1.8, 1.5, 0.0])
    mis = D.sequence_mask(log_ratio, mask, 0.0, 1.8)                  # row 0 (2.0 > 1.8) masked
    assert mis.flatten().tolist() == pytest.approx([0.0, 0.0, 1.5, 0.0])
    ice = D.icepop_mask(log_ratio, mask, 0.5, 2.0)                     # 4.0 masked, 0.5 kept (bound)
    assert ice.flatten().tolist() == pytest.approx([0.5, 0.0, 1.5, 0.0])
    geo = D.geometric_mask(log_ratio, mask, 0.5, 1.2)                  # geo means sqrt(2) = 1.41, 1.5
    assert geo.flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    geo = D.geometric_mask(log_ratio, mask, 0.5, 1.45)
    assert geo.flatten().tolist() == pytest.approx([0.5, 4.0, 0.0, 0.0])
    assert D.correction_weights("none", log_ratio, mask, 0, 2).flatten().tolist() == pytest.approx([0.5, 4.0, 1.5, 0.0])
    with pytest.raises(ValueError, match="unknown correction"):
        D.correction_weights("clip", log_ratio, mask, 0, 2)


def test_correction_diagnostics_hand_computed():
    log_ratio = _lr([0.5, 4.0], [1.5, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    d = D.correction_diagnostics(log_ratio, D.truncated_is(log_ratio, mask, 0.0, 2.0), mask)
    raw, w = np.array([0.5, 4.0, 1.5]), np.array([0.5, 2.0, 1.5])
    assert d["ess_raw"] == pytest.approx(D.effective_sample_size(raw))
    assert d["ess"] == pytest.approx(D.effective_sample_size(w)) and d["ess"] > d["ess_raw"]
    assert d["clipped_mass"] == pytest.approx(2.0 / 6.0)
    assert d["masked_tokens"] == 0 and d["masked_rows"] == 0 and d["ratio_max"] == pytest.approx(4.0)
    m = D.correction_diagnostics(log_ratio, D.sequence_mask(log_ratio, mask, 0.0, 1.8), mask)
    assert m["masked_rows"] == 0.5 and m["masked_tokens"] == pytest.approx(2 / 3)
    assert m["abs_log_ratio"] == pytest.approx(np.mean(np.abs(np.log(raw))), rel=1e-5)


@pytest.mark.parametrize("name", sorted(D.CORRECTIONS))
def test_every_correction_is_one_on_policy(name):
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = D.correction_weights(name, torch.zeros(1, 3), mask, 0.5, 2.0)
    assert w.tolist() == [[1.0, 1.0, 0.0]]
    assert math.isclose(D.correction_diagnostics(torch.zeros(1, 3), w, mask)["ess"], 1.0)


def test_state_dict_is_plain_data():
    pool = FIFOReplayPool(window=2)
    pool.register("run", "fp")
    pool.send(groups_table(0))
    state = pool.state_dict()
    assert isinstance(state["table"], bytes) and state["version"] == 0
    assert pa.ipc.open_stream(state["table"]).read_all().num_rows == len(pool)
