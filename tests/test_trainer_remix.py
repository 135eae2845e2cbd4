"""The ReMix trainer on a real tiny model on the CPU: exact GRPO reduction, reincarnation, hooks,
checkpoint/resume, the CLI, and a short seeded run that raises held-out success."""

import copy
import json

import numpy as np
import pytest
import torch

from sponge.groups import group_advantages
from sponge.record import conform, validate
from sponge.trainer import (
    CharTokenizer,
    ReMixConfig,
    ReMixTrainer,
    build_tiny_model,
    make_task,
    warm_start,
)
from sponge.trainer import losses as L
from sponge.trainer.models import response_logprobs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def warm_model():
    """A tiny policy after a short supervised warm start (rewards not all zero)."""
    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, seed=0)
    warm_start(model, tok, task, steps=50, seed=0)
    return task, tok, model


def small(**kw):
    base = {"prompts_per_step": 4, "group_size": 4, "eval_size": 32, "progress": False, "rollout_budget": 10_000}
    base.update(kw)
    return base


def test_grpo_config_step_equals_a_hand_written_grpo_update(warm_model):
    task, tok, model = warm_model
    start = copy.deepcopy(model)
    batches = []
    cfg = ReMixConfig.grpo(**small(kl_coef=0.0, learning_rate=1e-3))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, cfg, on_rollouts=batches.append)
    record = trainer.step()
    assert record["n_replay"] == 0 and record["updates"] == 1

    # The same batch, by hand: GRPO = PPO clip against the behaviour log-probs, group advantages.
    (table,) = batches
    manual = start
    opt = torch.optim.Adam(manual.parameters(), lr=1e-3)
    p_tok = table.column("prompt_tokens").to_pylist()
    r_tok = table.column("response_tokens").to_pylist()
    scores = response_logprobs(manual, p_tok, r_tok, tok.pad_token_id)
    behaviour = torch.zeros_like(scores.logprobs)
    for i, lp in enumerate(table.column("behavior_logprobs").to_pylist()):
        behaviour[i, : len(lp)] = torch.tensor(lp)
    groups = np.array([hash(p) for p in table.column("prompt_id").to_pylist()])
    adv = torch.from_numpy(group_advantages(table.column("reward").to_numpy(), groups))
    loss = L.aggregate(L.ppo_clip_loss(scores.logprobs, behaviour, adv, scores.mask, 0.2), scores.mask)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(manual.parameters(), 1.0)
    opt.step()
    assert record["pg_loss"] == pytest.approx(loss.item(), abs=1e-6)
    for (name, a), b in zip(trainer.policy.named_parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_reincarnation_resets_reference_and_turns_replay_off(warm_model):
    task, tok, model = warm_model
    versions = []
    cfg = ReMixConfig(**small(reincarnate_at=2, kl_coef=0.05, lambda_hold=0, lambda_every=1, replay_unit="rollout",
                              dynamic_sampling=False))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, cfg, on_policy_version=versions.append)
    base_before = copy.deepcopy(trainer.base.state_dict())
    r1 = trainer.step()
    p = cfg.replay_fraction
    assert r1["n_replay"] == 0 and r1["n_fresh"] == round((1 - p) * 4) * 4   # nothing to replay yet
    r2 = trainer.step()
    if len(trainer.replay) or r2["n_replay"]:   # a first batch without any signal group leaves nothing to replay
        assert r2["n_replay"] == round(p / (1 - p) * r2["n_fresh"]) and r2["replay_on"]
    # version 2 = T: π_base ← current policy, replay off, λ's clock restarted
    assert trainer.reincarnated_at == 2 and not trainer.replay_on
    assert len(trainer.replay) == 0
    for k, v in trainer.policy.state_dict().items():
        assert torch.equal(trainer.base.state_dict()[k], v)
    assert any(not torch.equal(base_before[k], v) for k, v in trainer.base.state_dict().items())
    r3 = trainer.step()
    assert r3["n_replay"] == 0 and r3["n_fresh"] == 16 and r3["updates"] == 1
    assert r2["lambda"] == pytest.approx(0.9) and r3["lambda"] == 1.0
    assert versions == [1, 2, 3]


def test_hook_rollouts_are_valid_records_and_replay_is_stale_by_at_most_n(warm_model):
    task, tok, model = warm_model
    tables = []
    # 8 prompts a step: with fewer, a step of the two-minibatch defaults can find no signal group to draw
    cfg = ReMixConfig(**small(prompts_per_step=8, replay_window=2, reincarnate_after=None))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, cfg, on_rollouts=tables.append)
    records = [trainer.step() for _ in range(5)]
    for i, table in enumerate(tables):
        good, violations = validate(conform(table))
        assert violations == [] and good.num_rows == table.num_rows
        assert set(table.column("policy_version").to_pylist()) == {i}
    hist = {}
    for r in records[1:]:
        for staleness, count in r["replay_staleness_hist"].items():
            hist[staleness] = hist.get(staleness, 0) + count
    assert set(hist) <= {1, 2} and 2 in hist


def test_checkpoint_resume_is_bit_identical(warm_model, tmp_path):
    task, tok, model = warm_model
    cfg = ReMixConfig(**small(reincarnate_at=2, kl_coef=0.01, max_iterations=3, eval_every=100))
    straight = ReMixTrainer(copy.deepcopy(model), tok, task, cfg)
    for _ in range(3):
        straight.step()
    first = ReMixTrainer(copy.deepcopy(model), tok, task, cfg)
    first.step()
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = ReMixTrainer(build_tiny_model(tok, seed=99), tok, task, cfg)
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.version == 1 and len(resumed.replay) == len(first.replay) > 0
    resumed.step()
    resumed.step()
    assert resumed.reincarnated_at == 2 and resumed.rollouts_generated == straight.rollouts_generated
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resumed.load_checkpoint(tmp_path / "missing")


def test_short_remix_run_raises_held_out_success(tmp_path):
    """A real seeded run: ReMix with its defaults from a warm-started tiny model."""
    task = make_task("reverse")
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(tok, seed=0)
    warm_start(model, tok, task, steps=50, seed=0)
    cfg = ReMixConfig(rollout_budget=4000, eval_every=10, eval_size=256, seed=0, progress=False,
                      reincarnate_at=30)
    history = ReMixTrainer(model, tok, task, cfg, output_dir=tmp_path).train()
    start, end = history[0]["eval_success"], history[-1]["eval_success"]
    assert end >= start + 0.15, (start, end)   # measured here: 0.20 → ~0.55
    assert history[-1]["rollouts"] >= 4000
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(history) and json.loads(lines[-1])["eval_success"] == end
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoint" / "state.pt").exists()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="replay_fraction"):
        ReMixConfig(replay_fraction=1.0)
    with pytest.raises(ValueError, match="group_size"):
        ReMixConfig(group_size=1)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("chess")
    with pytest.raises(ValueError, match="alphabet"):
        CharTokenizer("0123").encode_prompt("12x")


def test_cli_train_runs_resumes_and_rejects_bad_flags(tmp_path, capsys):
    from sponge.cli import main

    out = tmp_path / "run"
    common = ["--out", str(out), "--eval-size", "16", "--prompts-per-step", "2", "--group-size", "4",
              "--warm-start-steps", "5", "--threads", "1"]
    assert main(["train", "--algo", "grpo", "--rollout-budget", "16", *common]) == 0
    assert '"rollouts": 16' in capsys.readouterr().out
    assert (out / "checkpoint" / "state.pt").exists() and (out / "metrics.csv").exists()
    assert main(["train", "--algo", "grpo", "--resume", "--rollout-budget", "32", *common]) == 0
    text = capsys.readouterr().out
    assert "resumed at policy version 2" in text and '"rollouts": 32' in text
    assert main(["train", "--replay-fraction", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "replay_fraction must be in [0, 1)" in capsys.readouterr().out


class StreamTask:
    """A fixed prompt stream (ignores the trainer's RNG) with a reward on token ids."""

    name = "stream"

    def __init__(self, task, tok):
        self.inner, self.tok, self.drawn = task, tok, 0
        self.stream = task.sample(np.random.default_rng(5), 10_000)[0]

    def sample(self, rng, n):
        out = self.stream[self.drawn: self.drawn + n]
        self.drawn += n
        return out, [self.inner.answer(p) for p in out]

    def score(self, prompts, generation):
        return np.array([float(list(ids) == self.tok.encode_response(self.inner.answer(p)))
                         for p, ids in zip(prompts, generation.response_tokens)], dtype=np.float32)

    def success(self, prompts, responses):
        return self.inner.success(prompts, responses)


def test_custom_task_eval_prompts_eval_fn_optimizer_and_wall_clock(warm_model):
    task, tok, model = warm_model
    stream = StreamTask(task, tok)
    held_out = task.eval_set(16, seed=77)[0]
    cfg = ReMixConfig(**small(max_iterations=2, eval_every=1))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, stream, cfg, eval_prompts=held_out,
                           optimizer=lambda params: torch.optim.SGD(params, lr=0.01))
    assert stream.drawn == 0                                    # evaluation never eats the stream
    history = trainer.train()
    assert stream.drawn == sum(r["n_fresh"] for r in history[1:]) // cfg.group_size
    assert isinstance(trainer.optimizer, torch.optim.SGD) and "eval_success" in history[-1]
    calls = []
    custom = ReMixTrainer(copy.deepcopy(model), tok, stream, cfg.replace(max_iterations=1),
                          eval_fn=lambda t: calls.append(t.version) or {"my_metric": 1.0})
    h = custom.train()
    assert calls == [0, 1] and h[-1]["my_metric"] == 1.0 and "eval_success" not in h[-1]
    capped = ReMixTrainer(copy.deepcopy(model), tok, task, cfg.replace(max_iterations=None, max_wall_seconds=0.01))
    capped.train()
    assert capped.version <= 1 < cfg.rollout_budget // 16       # stopped by the clock, not the budget


def test_dynamic_sampling_drops_no_signal_groups_and_fills_from_replay(warm_model):
    task, tok, model = warm_model
    cfg = ReMixConfig(**small(prompts_per_step=8, replay_fraction=0.25, reincarnate_after=None))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, cfg)
    records = [trainer.step() for _ in range(4)]
    for r in records:
        dropped = r["ds_zero_var_groups"] * cfg.group_size
        assert r["n_batch"] == r["n_fresh"] - dropped + r["n_replay"]
        assert r["ds_filled_rows"] <= dropped
    assert any(r["ds_filled_rows"] > 0 for r in records[1:]) and trainer.rollouts_saved > 0
    assert records[-1]["rollouts_saved_total"] == pytest.approx(trainer.rollouts_saved)
    grpo = ReMixTrainer(copy.deepcopy(model), tok, task, ReMixConfig.grpo(**small()))
    r = grpo.step()
    assert grpo.replay is None and r["n_batch"] == r["n_fresh"] and r["ds_filled_rows"] == 0


def test_collapse_guard_detects_and_rolls_back(warm_model, capsys):
    from sponge.trainer import CollapseGuard

    guard = CollapseGuard(entropy_floor=0.1, warmup_steps=2)
    assert guard.check({"entropy": 1.0, "reward_mean": 0.5, "ratio_max": 1.1}) is None
    assert "entropy fell" in guard.check({"entropy": 0.05, "reward_mean": 0.5})
    assert "token ratio" in guard.check({"ratio_max": 500.0})
    assert "non-finite" in guard.check({"loss": float("nan")})
    g = CollapseGuard(warmup_steps=2, reward_alpha=1.0)
    for reward in (0.5, 0.5, 0.5, 0.5):
        assert g.check({"reward_mean": reward}) is None
    assert "reward" in g.check({"reward_mean": 0.05})

    task, tok, model = warm_model
    cfg = ReMixConfig(**small(max_iterations=1, eval_every=1, collapse_ratio_max=1.0 + 1e-9, learning_rate=1e-3))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, cfg)
    history = trainer.train()
    assert len(trainer.collapses) == 1 and "collapse" in history[-1]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    for a, b in zip(trainer.policy.parameters(), model.parameters()):   # rolled back to the start
        assert torch.equal(a, b)
    assert "collapse detected" in capsys.readouterr().err


def test_train_help_documents_every_flag(capsys):
    from sponge.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    import dataclasses
    for f in dataclasses.fields(ReMixConfig):
        if f.name != "progress":
            assert "--" + f.name.replace("_", "-") in text
    assert "{none,tis,seq_tis,mis,icepop,geo_mask}" in text and "(default: tis; env SPONGE_CORRECTION)" in " ".join(text.split())
    assert "Per-token correction" in text


def test_adaptive_learning_rate_steps_down_where_a_step_moves_the_policy_too_far(warm_model):
    from sponge.trainer.remix import adapt_learning_rate

    assert adapt_learning_rate(3e-4, 0.02, 0.005, 3e-4) == pytest.approx(2e-4)       # too far: down
    assert adapt_learning_rate(1e-4, 0.001, 0.005, 3e-4) == pytest.approx(1.5e-4)    # too little: up
    assert adapt_learning_rate(3e-4, 0.001, 0.005, 3e-4) == pytest.approx(3e-4)      # never above the rate set
    assert adapt_learning_rate(1e-5, 0.5, 0.005, 3e-4) == pytest.approx(1e-5)        # nor below 1/30 of it
    assert adapt_learning_rate(2e-4, 0.006, 0.005, 3e-4) == pytest.approx(2e-4)      # within 2×: kept
    task, tok, model = warm_model
    # A target no step can stay under: the rate falls each iteration the first update's KL is measured.
    cfg = ReMixConfig(**small(step_kl_target=1e-9, learning_rate=1e-3, reincarnate_after=None))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, cfg)
    records = [trainer.step() for _ in range(3)]
    rates = [r["learning_rate"] for r in records]
    assert all(r["step_kl"] > 0 for r in records) and rates == pytest.approx([1e-3 / 1.5 ** i for i in (1, 2, 3)]), rates
    with pytest.raises(ValueError, match="step_kl_target"):
        ReMixConfig(step_kl_target=0.0)


def test_minibatches_take_a_step_each_over_a_partition_of_the_batch(warm_model):
    task, tok, model = warm_model
    cfg = ReMixConfig(**small(minibatches=2, updates_per_batch=2, target_kl=None, reincarnate_after=None))
    trainer = ReMixTrainer(copy.deepcopy(model), tok, task, cfg)
    seen = []
    original = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (seen.append(1), original(*a, **k))[1]
    records = [trainer.step() for _ in range(3)]
    assert [r["updates"] for r in records] == [4, 4, 4] and len(seen) == 12   # 2 passes × 2 minibatches
    assert any(r["n_replay"] for r in records[1:])   # replayed rows (π_k scored before the first step) took part
    assert all(np.isfinite(r["loss"]) and r["step_kl"] > 0 for r in records)
    with pytest.raises(ValueError, match="minibatches"):
        ReMixConfig(minibatches=0)
