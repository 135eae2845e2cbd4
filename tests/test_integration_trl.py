"""TRL's GRPOTrainer on sponge's replay loop (sponge.integrations.trl): real TRL, a tiny Llama built in
code, real replay sources (an in-process pool here; the service in test_integration_trl_service)."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

trl = pytest.importorskip("trl", minversion="1.16",
                          reason="the TRL integration needs the `trl` extra: pip install 'sponge[trl]'")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from sponge.contract import ReplaySource
from sponge.integrations.trl import (
    SpongeGRPOTrainer,
    SpongeReplayConfig,
)
from sponge.trainer import (
    CharTokenizer,
    TinyModelConfig,
    build_tiny_model,
    make_task,
    warm_start,
)
from sponge.trainer.models import response_logprobs
from sponge.trainer.replay import FIFOReplayPool

# One thread: on a shared 2-core machine OpenMP's spinning threads make tiny models 10x slower.
torch.set_num_threads(1)

GROUP = 4          # num_generations
BATCH = 8          # rows per generation (two prompts x four completions)


@pytest.fixture(scope="module")
def setup():
    """A reverse-the-digits task with partial credit (rewards vary within groups), its tokenizers and
    a tiny Llama warm-started a little (so some answers are right)."""
    task = make_task("reverse", partial_credit=0.5)
    char = CharTokenizer(task.alphabet)
    model = build_tiny_model(char, TinyModelConfig(arch="llama", n_positions=64), seed=0)
    warm_start(model, char, task, steps=30, seed=0)
    prompts, _ = task.sample(np.random.default_rng(0), 512)
    return task, char.to_hf(), model, Dataset.from_dict({"prompt": prompts})


def _args(tmp_path, steps: int, **overrides) -> GRPOConfig:
    base = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": BATCH, "num_generations": GROUP,
            "max_completion_length": 8, "max_steps": steps, "learning_rate": 1e-3, "logging_steps": 1,
            "report_to": "none", "use_cpu": True, "save_strategy": "no", "activation_checkpointing": False,
            "disable_dropout": True, "disable_tqdm": True, "bf16": False, "seed": 0}
    return GRPOConfig(**{**base, **overrides})


def _reward(task):
    def reward(prompts, completions, **_):
        return task.reward(prompts, completions).tolist()
    return reward


class Tap:
    """A real pool with a record of what reached it (every call goes through to the pool)."""

    def __init__(self, pool: ReplaySource, fail_sends: int = 0, fail_candidates: int = 0):
        self.pool, self.sent, self.fail_sends, self.fail_candidates = pool, [], fail_sends, fail_candidates

    def register(self, run_id, fingerprint):
        return self.pool.register(run_id, fingerprint)

    def send(self, rollouts):
        if self.fail_sends:      # a broker outage, which a real pool cannot have
            self.fail_sends -= 1
            raise ConnectionError("broker unreachable")
        self.pool.send(rollouts)
        self.sent.append(rollouts)

    def report_version(self, version):
        self.pool.report_version(version)

    def candidates(self, version, unit="group"):
        if self.fail_candidates:
            self.fail_candidates -= 1
            raise ConnectionError("service unreachable")
        return self.pool.candidates(version, unit)

    def clear(self):
        self.pool.clear()

    def state_dict(self):
        return self.pool.state_dict()

    def load_state_dict(self, state):
        self.pool.load_state_dict(state)


class Probe(SpongeGRPOTrainer):
    """Keeps every training batch the trainer builds."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.batches = getattr(self, "batches", []) + [out]
        return out


def test_grpo_steps_publish_every_group_and_replay_it_with_weights(setup, tmp_path):
    task, tok, model0, dataset = setup
    model = copy.deepcopy(model0)
    initial = copy.deepcopy(model0).eval()
    source = Tap(FIFOReplayPool(window=2))
    assert isinstance(source.pool, ReplaySource)
    steps = 4
    trainer = Probe(model=model, reward_funcs=_reward(task), args=_args(tmp_path, steps), train_dataset=dataset,
                    processing_class=tok, replay=source,
                    sponge_config=SpongeReplayConfig(run_id="trl-test", replay_fraction=0.5))
    trainer.train()

    # Every generated rollout reached the source once, with its run, version and group.
    assert [t.num_rows for t in source.sent] == [BATCH] * steps
    sent = pa.concat_tables(source.sent)
    assert set(sent.column("run_id").to_pylist()) == {"trl-test"}
    assert [t.column("policy_version").to_pylist() for t in source.sent] == [[v] * BATCH for v in range(steps)]
    assert len(sent.column("rollout_id").unique()) == sent.num_rows
    for t in source.sent:
        _, counts = np.unique(t.column("prompt_id").to_numpy(zero_copy_only=False), return_counts=True)
        assert counts.tolist() == [GROUP] * (BATCH // GROUP)
    assert pc.all(pc.equal(pc.list_value_length(sent.column("behavior_logprobs")),
                           pc.list_value_length(sent.column("response_tokens")))).as_py()
    assert trainer.sponge_published == steps * BATCH
    assert source.pool.version == steps == trainer.sponge_version

    # The behaviour log-probs are the generating policy's, at the sampling temperature: version 0's
    # rows scored again by a copy of the initial weights.
    first = source.sent[0]
    scores = response_logprobs(initial, first.column("prompt_tokens").to_pylist(),
                               first.column("response_tokens").to_pylist(), tok.pad_token_id, temperature=1.0)
    stored = torch.zeros_like(scores.logprobs)
    for i, row in enumerate(first.column("behavior_logprobs").to_pylist()):
        stored[i, : len(row)] = torch.tensor(row)
    torch.testing.assert_close(stored, scores.logprobs, atol=2e-4, rtol=0)

    # Replay entered the batches from the second generation on, as rows that carry weights.
    replayed = [b for b in trainer.batches if (b["sponge_row"] < 0).any()]
    assert len(replayed) >= steps - 2
    for batch in replayed:
        rows = batch["sponge_row"] < 0
        assert batch["completion_ids"].shape[0] % trainer.args.steps_per_generation == 0
        weights = batch["sponge_weight"][rows]
        assert torch.isfinite(weights).all() and (weights > 0).all()
        assert torch.isfinite(batch["sponge_logp_behavior"][rows]).all()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == steps and all(math.isfinite(h["loss"]) for h in logged)
    assert any(h.get("sponge/replay_rows", 0) > 0 for h in logged)
    assert all(0 < h["sponge/ess_truncated"] <= 1 and 0 <= h["sponge/clipped_mass"] < 1
               for h in logged if h.get("sponge/replay_rows", 0) > 0)


def test_split_loss_equals_trls_own_loss_on_policy(setup, tmp_path):
    """Rows marked replayed whose behaviour and current log-probs are the policy's own must give TRL's
    loss exactly (Mix-PPG with c = 1 is PPO), value and gradient, under each of TRL's normalisations."""
    task, tok, model0, dataset = setup
    model = copy.deepcopy(model0)
    trainer = SpongeGRPOTrainer(model=model, reward_funcs=_reward(task), args=_args(tmp_path, 1),
                                train_dataset=dataset, processing_class=tok, replay=FIFOReplayPool(window=2))
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    g = torch.Generator().manual_seed(0)
    n, lengths = 6, [3, 7, 5, 1, 7, 4]
    prompts = [[1] + torch.randint(3, 14, (k,), generator=g).tolist() for k in (3, 5, 4, 5, 2, 4)]
    completions = [torch.randint(3, 14, (k,), generator=g).tolist() for k in lengths]
    logp, _ = trainer._sponge_score(prompts, completions)
    from sponge.integrations.trl import _pad_rows
    inputs = {
        "prompt_ids": _pad_rows(prompts, 0, "left", 6), "prompt_mask": _pad_rows([[1] * len(p) for p in prompts], 0, "left", 6),
        "completion_ids": _pad_rows(completions, 0, "right", 7),
        "completion_mask": _pad_rows([[1] * k for k in lengths], 0, "right", 7),
        "advantages": torch.randn(n, generator=g), "num_items_in_batch": torch.tensor(float(sum(lengths))),
    }

    def loss_and_grad(fn, batch):
        model.zero_grad()
        loss = fn(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    mixed = {**inputs, "sponge_row": torch.tensor([0, -1, 1, -1, -1, 2]), "sponge_logp_behavior": logp,
             "sponge_logp_current": logp.clone(), "sponge_weight": torch.ones(n)}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):   # the four ways TRL normalises a batch
        trainer.loss_type = loss_type
        trl_loss, trl_grad = loss_and_grad(lambda m, b: GRPOTrainer._compute_loss(trainer, m, b), inputs)
        ours, our_grad = loss_and_grad(trainer._compute_loss, mixed)
        torch.testing.assert_close(ours, trl_loss, atol=1e-6, rtol=1e-5, msg=loss_type)
        for a, b in zip(our_grad, trl_grad):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=loss_type)


def test_resume_from_a_checkpoint_continues_versions_and_restores_the_source(setup, tmp_path):
    task, tok, model0, dataset = setup
    cfg = SpongeReplayConfig(run_id="trl-resume")
    first = Tap(FIFOReplayPool(window=2))
    args = _args(tmp_path, 2, save_strategy="steps", save_steps=2)
    SpongeGRPOTrainer(model=copy.deepcopy(model0), reward_funcs=_reward(task), args=args, train_dataset=dataset,
                      processing_class=tok, replay=first, sponge_config=cfg).train()
    assert (tmp_path / "out" / "checkpoint-2" / "sponge_replay.pt").exists()

    again = Tap(FIFOReplayPool(window=2))     # a new process: an empty pool
    trainer = SpongeGRPOTrainer(model=copy.deepcopy(model0), reward_funcs=_reward(task), args=_args(tmp_path, 4),
                                train_dataset=dataset, processing_class=tok, replay=again, sponge_config=cfg)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    versions = [t.column("policy_version")[0].as_py() for t in again.sent]
    assert versions == [2, 3]                 # continued, not restarted at 0
    assert again.pool.version == 4 == trainer.sponge_version
    # The pool came back from the checkpoint: version 1's groups were replayable at version 2.
    assert set(pc.unique(again.pool.table.column("policy_version")).to_pylist()) >= {2, 3}
    ids = set(pa.concat_tables(first.sent).column("rollout_id").to_pylist())
    assert ids.isdisjoint(pa.concat_tables(again.sent).column("rollout_id").to_pylist())


def test_an_unreachable_source_loses_no_rollouts_and_does_not_stop_training(setup, tmp_path):
    task, tok, model0, dataset = setup
    source = Tap(FIFOReplayPool(window=2), fail_sends=2, fail_candidates=1)
    trainer = SpongeGRPOTrainer(model=copy.deepcopy(model0), reward_funcs=_reward(task), args=_args(tmp_path, 4),
                                train_dataset=dataset, processing_class=tok, replay=source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert sum("send failed" in str(w.message) for w in caught) == 2
    assert any("trains without replay" in str(w.message) for w in caught)
    # Retried in order once the source was back: every version, once each.
    assert [t.column("policy_version")[0].as_py() for t in source.sent] == [0, 1, 2, 3]
    assert trainer.sponge_published == 4 * BATCH


def test_models_with_absolute_positions_are_warned_about(setup, tmp_path):
    task, tok, _, dataset = setup
    gpt2 = build_tiny_model(CharTokenizer(task.alphabet), seed=0)
    with pytest.warns(UserWarning, match="left padding"):
        SpongeGRPOTrainer(model=gpt2, reward_funcs=_reward(task), args=_args(tmp_path, 1), train_dataset=dataset,
                          processing_class=tok, replay=FIFOReplayPool())


def test_bad_configuration_is_refused_in_one_line():
    with pytest.raises(ValueError, match="replay_fraction must be in"):
        SpongeReplayConfig(replay_fraction=1.0)
    with pytest.raises(ValueError, match="policy_loss must be"):
        SpongeReplayConfig(policy_loss="ppo")


@pytest.fixture
def service(broker, topic, tmp_path):
    """`sponge serve` in a thread: ingest from the test's topic, curation with a small selector."""

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


def test_trl_trains_on_replay_from_the_service(setup, service, broker, topic, tmp_path):
    """TRL → Kafka → `sponge serve` (store, selector) → curated groups over HTTP → TRL's batches."""
    from helpers import wait_for

    from sponge.client import ServiceClient, ServiceReplaySource

    task, tok, model0, dataset = setup
    source = ServiceReplaySource(service.http.url, bootstrap_servers=broker, topic=topic, window=4, wait_s=60)
    assert isinstance(source, ReplaySource)
    steps = 4
    trainer = SpongeGRPOTrainer(model=copy.deepcopy(model0), reward_funcs=_reward(task), args=_args(tmp_path, steps),
                                train_dataset=dataset, processing_class=tok, replay=source,
                                sponge_config=SpongeReplayConfig(run_id="trl-service", replay_fraction=0.5))
    trainer.train()
    source.close()

    def stored() -> dict[int, int]:
        rows = service.store.sql("SELECT policy_version, count(*) AS n FROM rollouts "
                                 "WHERE run_id = 'trl-service' GROUP BY 1 ORDER BY 1")
        return dict(zip(rows.column(0).to_pylist(), rows.column(1).to_pylist()))

    wait_for(lambda: sum(stored().values()) == steps * BATCH, 60, "every rollout TRL generated to be stored")
    assert stored() == {v: BATCH for v in range(steps)}
    client = ServiceClient(service.http.url)
    assert client.run("trl-service")["policy_version"] == steps
    client.close()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logged)
    assert sum(h.get("sponge/replay_rows", 0) for h in logged) > 0, [h.get("sponge/replay_rows") for h in logged]
    assert source.incomplete_draws == 0        # every draw saw every rollout this trainer had sent
