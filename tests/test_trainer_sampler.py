"""Density ratios, truncation, self-normalisation, ESS and the replay pools and sampler."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from sponge.record import conform, validate
from sponge.trainer import (
    CharTokenizer,
    DiverseReplayPool,
    FIFOReplayPool,
    ReplaySampler,
    TransformersGenerator,
    build_tiny_model,
    make_task,
    response_logprobs,
    rollouts_table,
)
from sponge.trainer import density_ratio as D

torch.set_num_threads(1)


def test_ess_formula():
    assert D.effective_sample_size(np.ones(7)) == pytest.approx(1.0)
    assert D.effective_sample_size(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)
    assert D.effective_sample_size(np.array([1.0, 2, 3])) == pytest.approx(36 / (3 * 14))


def test_truncation_cap_schedule_and_truncate():
    assert D.truncation_cap(1) == 2.0           # γ·K = 1 → floor 2
    assert D.truncation_cap(5) == 5.0
    assert D.truncation_cap(40) == 10.0          # ceiling
    assert D.truncation_cap(3, gamma=2.0, cap_min=1.0, cap_max=100.0) == 6.0
    with pytest.raises(ValueError):
        D.truncation_cap(3, cap_min=5, cap_max=2)
    assert D.truncate(np.array([1.0, 4, 0.5, 10]), 2.0).tolist() == [1.0, 2.0, 0.5, 2.0]


def test_self_normalise_and_diagnostics():
    w = np.array([1.0, 2, 3, 0.5])
    assert D.self_normalise(w).mean() == pytest.approx(1.0)
    raw = np.array([1.0, 4, 0.5, 10])
    stats = D.ratio_diagnostics(raw, D.truncate(raw, 2.0), np.array([1, 2, 2, 1]))
    assert stats["clip_fraction"] == 0.5
    assert stats["clipped_mass"] == pytest.approx((2 + 8) / 15.5)
    assert stats["mean_raw_weight"] == pytest.approx(15.5 / 4)
    assert stats["ess_raw"] == pytest.approx(15.5**2 / (4 * (1 + 16 + 0.25 + 100)))
    assert stats["ess_truncated"] == pytest.approx(5.5**2 / (4 * (1 + 4 + 0.25 + 4)))
    assert stats["ess_truncated"] > stats["ess_raw"]      # truncation buys variance
    assert stats["staleness_hist"] == {1: 2, 2: 2}


def test_log_density_ratios_sequence_and_geometric():
    cur = torch.log(torch.tensor([[0.2, 0.5], [0.3, 0.0]]))
    beh = torch.log(torch.tensor([[0.1, 0.5], [0.6, 1.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cur = torch.nan_to_num(cur, neginf=0.0)
    seq = D.log_density_ratios(cur, beh, mask, "sequence").exp()
    assert seq.tolist() == pytest.approx([2.0, 0.5])
    geo = D.log_density_ratios(cur, beh, mask, "geometric").exp()
    assert geo.tolist() == pytest.approx([math.sqrt(2.0), 0.5])
    with pytest.raises(ValueError, match="ratio mode"):
        D.log_density_ratios(cur, beh, mask, "token")


def _table(n, version, behavior_p, rewards=None, prompts=None, responses=None, advantages=None):
    return rollouts_table(
        rollout_ids=[f"v{version}-{i}" for i in range(n)], prompt_ids=[f"p{i // 2}" for i in range(n)],
        prompts=prompts or [f"{i}>" for i in range(n)], responses=responses or [str(i) for i in range(n)],
        prompt_tokens=[[1, 3 + i % 10] for i in range(n)], response_tokens=[[3 + i % 10] for i in range(n)],
        behavior_logprobs=[np.array([math.log(p)], np.float32) for p in behavior_p],
        rewards=np.zeros(n) if rewards is None else rewards, policy_version=version, advantages=advantages,
    )


def _fixed_scores(current_p):
    """log π_k of each row's one response token, looked up by that token (3 + row index % 10)."""
    by_token = {3 + i: p for i, p in enumerate(current_p)}

    def score(prompt_tokens, response_tokens):
        lp = torch.log(torch.tensor([by_token[r[0]] for r in response_tokens], dtype=torch.float32))[:, None]
        return lp, torch.ones_like(lp)
    return score


def test_sampler_weight_mode_truncates_and_self_normalises():
    cands = _table(4, 0, [0.1] * 4, advantages=np.ones(4))
    sampler = ReplaySampler(mode="weight", cap=3.0)
    draw = sampler.draw(cands, 4, _fixed_scores([0.1, 0.2, 0.5, 0.05]), current_version=1,
                        rng=np.random.default_rng(0))
    # raw w = [1, 2, 5, 0.5] → truncated [1, 2, 3, 0.5] → / mean 1.625
    drawn_ids = draw.table.column("rollout_id").to_pylist()
    expected = {"v0-0": 1 / 1.625, "v0-1": 2 / 1.625, "v0-2": 3 / 1.625, "v0-3": 0.5 / 1.625}
    assert sorted(drawn_ids) == sorted(expected)
    assert draw.weights.tolist() == pytest.approx([expected[i] for i in drawn_ids], rel=1e-5)
    assert draw.weights.mean() == pytest.approx(1.0)
    s = draw.stats
    assert s["clip_fraction"] == 0.25 and s["clipped_mass"] == pytest.approx(2 / 8.5)
    assert s["ess_raw"] == pytest.approx(8.5**2 / (4 * 30.25))
    assert s["staleness_hist"] == {1: 4} and s["cap"] == 3.0
    # the current log-probs travel with the chosen rows (clip centre numerator)
    cur = dict(zip(["v0-0", "v0-1", "v0-2", "v0-3"], [0.1, 0.2, 0.5, 0.05]))
    assert draw.logp_current[:, 0].exp().tolist() == pytest.approx([cur[i] for i in drawn_ids], rel=1e-5)


def test_sampler_resample_mode_draws_proportional_to_truncated_ratio():
    cands = _table(4, 0, [0.1] * 4, advantages=np.ones(4))
    draw = ReplaySampler(mode="resample", cap=3.0).draw(
        cands, 20000, _fixed_scores([0.1, 0.2, 0.5, 0.05]), 1, np.random.default_rng(1))
    assert (draw.weights == 1).all()
    ids, counts = np.unique(draw.table.column("rollout_id").to_numpy(zero_copy_only=False), return_counts=True)
    freq = dict(zip(ids, counts / 20000))
    for rid, w in zip(["v0-0", "v0-1", "v0-2", "v0-3"], [1, 2, 3, 0.5]):
        assert freq[rid] == pytest.approx(w / 6.5, abs=0.015)


def test_sampler_cap_schedule_uses_number_of_versions_and_recency():
    cands = pa.concat_tables([_table(4, v, [0.1] * 4, advantages=np.ones(4)) for v in (3, 4, 5)])
    sampler = ReplaySampler(mode="uniform", cap_gamma=1.5, recency_decay=0.5)
    draw = sampler.draw(cands, 6000, _fixed_scores([0.1] * 4), 6, np.random.default_rng(2))
    assert draw.stats["cap"] == pytest.approx(4.5)   # clip(1.5 · 3 versions, 2, 10)
    staleness = 6 - draw.table.column("policy_version").to_numpy()
    share = np.bincount(staleness, minlength=4)[1:] / 6000
    assert share == pytest.approx(np.array([4, 2, 1]) / 7, abs=0.02)   # decay 0.5 per version


def test_sampler_recomputes_group_advantages_when_absent():
    cands = _table(4, 0, [0.5] * 4, rewards=np.array([1.0, 0.0, 1.0, 1.0]))
    draw = ReplaySampler(mode="uniform").draw(cands, 4, _fixed_scores([0.5] * 4), 1, np.random.default_rng(0))
    adv = dict(zip(draw.table.column("rollout_id").to_pylist(), draw.advantages))
    assert adv["v0-0"] == pytest.approx(1.0, abs=1e-4) and adv["v0-1"] == pytest.approx(-1.0, abs=1e-4)
    assert adv["v0-2"] == 0 and adv["v0-3"] == 0


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="replay mode"):
        ReplaySampler(mode="greedy")
    bad = _table(2, 0, [0.5, 0.5]).drop_columns(["behavior_logprobs"])
    with pytest.raises(ValueError, match="behavior_logprobs"):
        ReplaySampler().draw(bad, 2, _fixed_scores([0.5, 0.5]), 1, np.random.default_rng(0))
    assert ReplaySampler().draw(_table(2, 0, [0.5, 0.5]).slice(0, 0), 2, None, 1,
                                np.random.default_rng(0)) is None


def test_fifo_pool_window_and_eviction():
    pool = FIFOReplayPool(window=2)
    assert pool.register("run", "fp") == 0
    signal = np.array([1.0, 0.0, 1.0, 1.0])          # p0: {1, 0} has signal, p1: {1, 1} has none
    for v in range(4):
        pool.send(_table(4, v, [0.5] * 4, rewards=signal).set_column(2, "run_id", pa.array(["run"] * 4)))
        pool.report_version(v + 1) if v < 2 else None
    assert sorted(set(pool.candidates(3).column("policy_version").to_pylist())) == [1, 2]
    assert set(pool.candidates(3).column("prompt_id").to_pylist()) == {"p0"}   # no-signal group never kept
    pool.report_version(3)
    assert len(pool) == 6                    # version 0 evicted, version 3 kept for later
    assert sorted(set(pool.candidates(4).column("policy_version").to_pylist())) == [2, 3]
    pool.clear()
    assert pool.candidates(5).num_rows == 0
    with pytest.raises(ValueError, match="lacks"):
        pool.send(pa.table({"rollout_id": ["x"]}))
    with pytest.raises(ValueError, match="only go up"):
        pool.report_version(1)


def test_diverse_pool_dedupes_and_caps_and_serves_whole_groups():
    prompts = ["12>"] * 4 + ["34>", "34>", "78>", "78>"]
    responses = ["21", "21", "22", "11", "43", "44", "87", "88"]
    rewards = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    pool = DiverseReplayPool(window=2, capacity=3)
    pool.send(_table(8, 0, [0.5] * 8, prompts=prompts, responses=responses, rewards=rewards))
    rows = pool.candidates(1, unit="rollout")
    assert rows.num_rows == 3
    pairs = list(zip(rows.column("prompt").to_pylist(), rows.column("response").to_pylist()))
    assert len(set(pairs)) == 3
    groups = pool.candidates(1, unit="group")
    sizes = dict(zip(*np.unique(groups.column("group_id").to_numpy(zero_copy_only=False), return_counts=True)))
    full = {"p0@0": 2, "p1@0": 2, "p2@0": 2, "p3@0": 2}
    assert all(full[g] == n for g, n in sizes.items())     # whole groups


def test_generator_logprobs_match_scoring_so_fresh_ratios_are_one():
    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, seed=3)
    prompts, _ = task.sample(np.random.default_rng(0), 24)
    gen = TransformersGenerator(tok).generate(model, [tok.encode_prompt(p) for p in prompts], 7, 1.0, seed=5)
    table = rollouts_table(
        rollout_ids=[f"r{i}" for i in range(24)], prompt_ids=[f"p{i}" for i in range(24)], prompts=prompts,
        responses=gen.responses, prompt_tokens=gen.prompt_tokens, response_tokens=gen.response_tokens,
        behavior_logprobs=gen.logprobs, rewards=task.reward(prompts, gen.responses), policy_version=0)
    good, violations = validate(conform(table))   # the record schema the streams publish
    assert violations == [] and good.num_rows == 24

    def score(p, r):
        with torch.no_grad():
            s = response_logprobs(model, p, r, tok.pad_token_id)
        return s.logprobs, s.mask
    draw = ReplaySampler(mode="weight").draw(table, 24, score, 1, np.random.default_rng(0))
    assert draw.stats["mean_raw_weight"] == pytest.approx(1.0, abs=1e-4)
    assert draw.stats["ess_raw"] == pytest.approx(1.0, abs=1e-6) and draw.stats["clip_fraction"] == 0


def _digit_groups(rng, n_groups, version, group=4, success=None):
    """n_groups groups of `group` rollouts; group g has success[g] of its rollouts right."""
    digits = rng.integers(0, 10, size=(n_groups, 4))
    prompts = ["".join(map(str, d)) + ">" for d in digits for _ in range(group)]
    answers = ["".join(map(str, d[::-1])) for d in digits for _ in range(group)]
    success = np.full(n_groups, group // 2) if success is None else np.asarray(success)
    rewards = np.concatenate([(np.arange(group) < k).astype(float) for k in success])
    responses = [a if r else a[::-1] for a, r in zip(answers, rewards)]
    n = n_groups * group
    return rollouts_table(
        rollout_ids=[f"v{version}-{i}" for i in range(n)], prompt_ids=[f"p{i // group}" for i in range(n)],
        prompts=prompts, responses=responses, prompt_tokens=[[1, 3]] * n, response_tokens=[[3]] * n,
        behavior_logprobs=[np.array([-0.5], np.float32)] * n, rewards=rewards, policy_version=version,
        run_id="run")


