"""A ReMix training run that sends its rollouts to `sponge serve` and replays what the service curates.

Start a broker and the service in two terminals, then this script:

    sponge broker --topic rollouts                    # Kafka on 127.0.0.1:9092
    sponge serve                                      # reads it, stores in ./sponge-data, HTTP on :8765
    python examples/remix_with_service.py             # trains; --help for its settings

The README's "From a training script" is this file; tests/test_examples.py runs it against a real broker
and service. For a Hugging Face model of your own, replace the three model lines with
`model, tokenizer = load_pretrained("./my-model")` (a local directory; nothing is downloaded).
"""

import argparse

from sponge.client import ServiceReplaySource
from sponge.trainer import CharTokenizer, ReMixConfig, ReMixTrainer, build_tiny_model, make_task, warm_start

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--url", default="http://127.0.0.1:8765", help="the service (sponge serve prints it)")
parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="the Kafka the service reads")
parser.add_argument("--topic", default="rollouts", help="the topic the service reads")
parser.add_argument("--iterations", type=int, default=20, help="training iterations (policy versions)")
args = parser.parse_args()

task = make_task("reverse")                       # reverse a digit string; reward 1 for an exact answer
tokenizer = CharTokenizer(task.alphabet)
model = build_tiny_model(tokenizer, seed=0)       # a tiny GPT-2 built from a config, nothing downloaded
warm_start(model, tokenizer, task, steps=40)      # a little supervised start so rewards are not all 0

config = ReMixConfig(run_name="my-run", max_iterations=args.iterations)
# Fresh rollouts go to Kafka (the service stores them under this run); each iteration draws replay: whole
# groups of the run's recent versions that the service's selector keeps, with their behaviour log-probs.
source = ServiceReplaySource(args.url, args.bootstrap_servers, args.topic, window=config.replay_window)
trainer = ReMixTrainer(model, tokenizer, task, config, replay_source=source)
history = trainer.train()
source.close()
steps = [h for h in history if h.get("iteration", 0) > 0]   # the history also holds evaluation records
print(f"run {trainer.run_id}: version {trainer.version}, last eval success "
      f"{[h['eval_success'] for h in history if 'eval_success' in h][-1]:.2f}, "
      f"replayed groups in {sum(h.get('n_replay', 0) > 0 for h in steps)} of {len(steps)} iterations")
