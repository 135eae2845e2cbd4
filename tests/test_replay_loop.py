"""The replay loop as a newcomer meets it: a default `sponge serve` process, a store that already holds
other runs' rows, and trainers that come and go — real broker, real service process, real training."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pyarrow as pa
import pytest
from helpers import serve, stop, wait_for

from sponge.client import ServiceClient, ServiceReplaySource
from sponge.streams.producer import RolloutProducer
from sponge.streams.synthetic import SyntheticConfig, synthetic_rollouts


def tiny_setup(seed: int = 0):
    from sponge.trainer import CharTokenizer, build_tiny_model, make_task, warm_start

    task = make_task("reverse")
    tokenizer = CharTokenizer(task.alphabet)
    model = build_tiny_model(tokenizer, seed=seed)
    warm_start(model, tokenizer, task, steps=40, seed=seed)
    return model, tokenizer, task


@pytest.mark.slow
def test_two_trainers_one_after_the_other_against_a_default_service_over_other_data(broker, topic, tmp_path):
    from sponge.trainer import ReMixConfig, ReMixTrainer

    store = tmp_path / "store"
    proc, url = serve(broker, topic, store, tmp_path / "serve.log")
    client = ServiceClient(url)
    try:
        # Other data first: `sponge produce`-style synthetic rows (another tokenizer, 300-token
        # responses) and a run registered by someone else with another fingerprint.
        client.register_run("someone-else", "another-tokenizer")
        other = synthetic_rollouts(128, seed=1, config=SyntheticConfig(run_id="someone-else", policy_version=3))
        produced = synthetic_rollouts(256, seed=2, config=SyntheticConfig(policy_version=7))
        with RolloutProducer(broker, topic) as producer:
            producer.send(pa.concat_tables([other, produced]))
            producer.flush()
        wait_for(lambda: client.run("someone-else")["arrived"] == {"3": 128}, 120, "the other run's rows")

        histories = []
        for attempt in range(2):   # the newcomer runs the README script twice
            model, tokenizer, task = tiny_setup(seed=attempt)
            config = ReMixConfig(prompts_per_step=8, group_size=8, max_iterations=6, eval_size=16, eval_every=6,
                                 progress=False, run_name=f"newcomer-{attempt}", seed=attempt)
            source = ServiceReplaySource(url, broker, topic, window=config.replay_window, wait_s=60)
            trainer = ReMixTrainer(model, tokenizer, task, config, replay_source=source)
            histories.append(trainer.train())
            source.close()   # delivers the last version report, which goes out on the source's own thread
            run = client.run(trainer.run_id)
            # Nothing of this run refused, replay drawn once the window had data, the service agrees on
            # the version, and no draw ended before the trainer's own rollouts were in.
            assert run["refused"].get("retired", 0) == 0, run
            assert run["policy_version"] == trainer.version == 6
            assert source.incomplete_draws == 0 and run["incomplete_draws"] == 0
            replayed = [h.get("n_replay", 0) for h in histories[-1] if h.get("iteration", 0) >= 2]
            assert replayed and all(n > 0 for n in replayed), [h.get("n_replay") for h in histories[-1]]
        # Each trainer's rollouts landed in the store under its own run and versions.
        by_run = client.sql("SELECT run_id, min(policy_version) AS lo, max(policy_version) AS hi, count(*) AS n "
                            "FROM rollouts GROUP BY 1 ORDER BY 1").to_pydict()
        assert {"newcomer-0-s0", "newcomer-1-s1", "someone-else", "synthetic"} <= set(by_run["run_id"])
        metrics = httpx.get(f"{url}/metrics").text
        assert 'sponge_run_policy_version{run="newcomer-1-s1"} 6.0' in metrics
    finally:
        client.close()
        stop(proc)


@pytest.mark.long
@pytest.mark.slow
def test_checkpoint_kill_the_trainer_and_resume_goes_on_with_version_and_replay(broker, topic, tmp_path):
    """Checkpoint, kill -9 the trainer, resume: the run's version and replay go on."""
    proc, url = serve(broker, topic, tmp_path / "store", tmp_path / "serve.log")
    script = tmp_path / "train.py"
    script.write_text(f'''
import sys
from sponge.client import ServiceReplaySource
from sponge.trainer import CharTokenizer, ReMixConfig, ReMixTrainer, build_tiny_model, make_task, warm_start
task = make_task("reverse"); tok = CharTokenizer(task.alphabet); model = build_tiny_model(tok, seed=0)
warm_start(model, tok, task, steps=40, seed=0)
config = ReMixConfig(prompts_per_step=8, group_size=8, max_iterations=int(sys.argv[1]), eval_size=8,
                     eval_every=100, checkpoint_every=1, progress=False, run_name="resumable")
source = ServiceReplaySource({url!r}, {broker!r}, {topic!r}, window=config.replay_window, wait_s=60)
trainer = ReMixTrainer(model, tok, task, config, replay_source=source, output_dir={str(tmp_path / "run")!r})
if len(sys.argv) > 2:
    trainer.load_checkpoint({str(tmp_path / "run" / "checkpoint")!r})
    print("RESUMED", trainer.version, flush=True)
history = trainer.train()
print("DONE", trainer.version, sum(h.get("n_replay", 0) > 0 for h in history if h.get("iteration", 0) > trainer.version - 3), flush=True)
''')
    client = ServiceClient(url)
    try:
        first = subprocess.Popen([sys.executable, str(script), "50"], stdout=subprocess.PIPE, text=True)
        wait_for(lambda: _version(client, "resumable-s0") >= 3, 300, "three versions trained")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed_at = _version(client, "resumable-s0")
        done = subprocess.run([sys.executable, str(script), str(killed_at + 3), "resume"], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = int(done.stdout.split("RESUMED")[1].split()[0])
        assert killed_at - 1 <= resumed <= killed_at             # the last checkpoint, at most one step back
        final, replaying = (int(x) for x in done.stdout.split("DONE")[1].split()[:2])
        assert final == _version(client, "resumable-s0") >= killed_at + 1
        assert replaying >= 1                                   # replay goes on after the resume
        assert client.run("resumable-s0")["refused"].get("retired", 0) == 0
    finally:
        client.close()
        stop(proc)


def _version(client: ServiceClient, run: str) -> int:
    try:
        return int(client.run(run)["policy_version"])
    except Exception:  # noqa: BLE001 - not registered yet
        return -1
