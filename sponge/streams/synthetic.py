"""Synthetic rollouts with realistic sizes, malformed messages of every kind, and `sponge produce`.

`synthetic_rollouts` builds an Arrow table column by column (no per-row Python):
GRPO groups of `group_size` rollouts per prompt_id, responses of a few hundred tokens
with behaviour log-probs, text of about four characters per token, 384-d unit-norm
embeddings clustered around a few topic centres (so diversity selection has structure
to find), binary-ish rewards and a policy version.

`malformed_message` turns a good batch into one message that breaks one rule the
validator names (or is not decodable at all, or is too big), and says which rollouts in
it are bad, so a test can check every bad one reached the dead-letter queue.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sponge.record import DEFAULT_EMBEDDING_DIM, DEFAULT_MAX_MESSAGE_BYTES, rollout_schema
from sponge.streams.codec import ARROW_CONTENT_TYPE, JSON_CONTENT_TYPE, encode_arrow, encode_json, headers_for

HELP = "send synthetic rollouts (optionally with malformed messages) to a Kafka topic"

_WORDS = ("the of and to in is that for it as with was on be by at this are from or an which have not "
          "step answer solve compute therefore value equation sum total first second then so we get "
          "number let each times plus minus equals result check final because since given find").split()


def _text_pool(rng: np.random.Generator, num_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """A long buffer of random words (uint8) and the positions where words start."""
    words = np.array([w + " " for w in _WORDS])
    picks = words[rng.integers(0, len(words), size=num_chars // 4 + 64)]
    text = "".join(picks.tolist()).encode()[:num_chars]
    buf = np.frombuffer(text, dtype=np.uint8)
    starts = np.flatnonzero(np.r_[True, buf[:-1] == ord(" ")])
    return buf, starts


def _strings(rng: np.random.Generator, pool: tuple[np.ndarray, np.ndarray], lengths: np.ndarray,
             prefix: pa.Array | None = None) -> pa.Array:
    """Strings of the given byte lengths cut from the word pool at word starts (vectorised)."""
    buf, word_starts = pool
    lengths = np.minimum(lengths, len(buf) // 2).astype(np.int64)
    starts = word_starts[rng.integers(0, np.searchsorted(word_starts, len(buf) // 2), size=len(lengths))]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)
    data = buf[gather]
    out = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(data))
    out = out.cast(pa.string())
    if prefix is not None:
        out = pc.binary_join_element_wise(prefix, out, "")
    return out


def _token_lists(rng: np.random.Generator, lengths: np.ndarray, vocab: int = 32_000
                 ) -> tuple[pa.Array, pa.Array]:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(0, vocab, size=int(offsets[-1]), dtype=np.int32)
    logprobs = -rng.exponential(0.7, size=int(offsets[-1])).astype(np.float32)
    return (pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(logprobs)))


@dataclass
class SyntheticConfig:
    """Shape of the synthetic stream. Sizes default to a realistic RFT rollout."""

    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    #: rollouts per prompt_id (a GRPO group)
    group_size: int = 8
    #: mean response length in tokens (uniform in ±1/3 of it)
    response_tokens: int = 300
    #: mean prompt length in tokens
    prompt_tokens: int = 60
    #: number of topic clusters the embeddings are drawn around
    clusters: int = 32
    #: spread of an embedding around its prompt's cluster centre (before normalising)
    cluster_noise: float = 0.35
    run_id: str = "synthetic"
    policy_version: int = 0


def synthetic_rollouts(n: int, seed: int = 0, config: SyntheticConfig | None = None,
                       id_prefix: str | None = None) -> pa.Table:
    """`n` valid rollouts (exact `rollout_schema`), ids `<prefix>-<i>` unique per (prefix, i)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    prefix = id_prefix if id_prefix is not None else f"{cfg.run_id}-s{seed}"
    index = np.arange(n, dtype=np.int64)
    group = index // cfg.group_size
    n_groups = int(group[-1]) + 1 if n else 0

    rollout_id = pc.binary_join_element_wise(prefix + "-r", pa.array(index).cast(pa.string()), "")
    prompt_id = pc.binary_join_element_wise(prefix + "-p", pa.array(group).cast(pa.string()), "")

    resp_len = rng.integers(cfg.response_tokens * 2 // 3, cfg.response_tokens * 4 // 3 + 1, size=n)
    prompt_len_g = rng.integers(cfg.prompt_tokens // 2, cfg.prompt_tokens * 3 // 2 + 1, size=n_groups)
    prompt_len = prompt_len_g[group]
    response_tokens, logprobs = _token_lists(rng, resp_len)
    prompt_tokens, _ = _token_lists(rng, prompt_len)

    pool = _text_pool(rng, 1 << 20)
    prompt_text_g = _strings(rng, pool, prompt_len_g * 4)
    prompt_text = prompt_text_g.take(pa.array(group))
    response_text = _strings(rng, pool, resp_len * 4)

    centres = rng.standard_normal((cfg.clusters, cfg.embedding_dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster_of_group = rng.integers(0, cfg.clusters, size=n_groups)
    emb = centres[cluster_of_group[group]] + cfg.cluster_noise * rng.standard_normal(
        (n, cfg.embedding_dim)).astype(np.float32) / np.sqrt(cfg.embedding_dim) * 4
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), cfg.embedding_dim)

    # Reward: a per-prompt difficulty, then Bernoulli correctness plus a little shaping noise.
    difficulty = rng.uniform(0.1, 0.9, size=n_groups)
    reward = (rng.uniform(size=n) < difficulty[group]).astype(np.float32)
    reward += rng.normal(0, 0.05, size=n).astype(np.float32)

    now_ms = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    created = pa.array(now_ms + index, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    meta = pc.binary_join_element_wise('{"group_index":', pa.array(index % cfg.group_size).cast(pa.string()),
                                       "}", "")
    return pa.Table.from_arrays([
        rollout_id, prompt_id, pa.array([cfg.run_id] * n, pa.string()) if n else pa.array([], pa.string()),
        prompt_text, response_text, prompt_tokens, response_tokens, logprobs,
        pa.array(reward, pa.float32()), pa.array(np.full(n, cfg.policy_version, np.int64)),
        created, embedding, meta,
    ], schema=rollout_schema(cfg.embedding_dim))


# ---- malformed messages -------------------------------------------------------------------

#: Every kind of bad input, with the rule the validator (or decoder) reports for it.
MALFORMED_KINDS: dict[str, str] = {
    "missing_field": "missing",              # a required column (reward) absent
    "null_required": "missing",              # a required value null in one row
    "wrong_type": "wrong type",              # reward column holds text
    "nonfinite_reward": "non-finite",
    "nonfinite_embedding": "non-finite",
    "wrong_embedding_dim": "wrong dimension",
    "logprob_length": "length mismatch",
    "negative_policy_version": "negative",
    "undecodable": "undecodable",            # random bytes declared as Arrow
    "bad_json": "undecodable",               # truncated JSON
    "oversized": "oversized",                # larger than the service's message limit
}


@dataclass
class MalformedMessage:
    kind: str
    rule: str
    value: bytes
    headers: list[tuple[str, bytes]]
    key: bytes
    #: rollout_ids of the bad rows (every row when the whole message is unreadable)
    bad_ids: list[str]
    #: rollout_ids of rows that are still valid and must be stored
    good_ids: list[str]


def malformed_message(kind: str, batch: pa.Table, rng: np.random.Generator,
                      max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> MalformedMessage:
    """Corrupt `batch` (valid rollouts) into one message breaking the rule `kind` names."""
    if kind not in MALFORMED_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(MALFORMED_KINDS)}")
    ids = batch.column("rollout_id").to_pylist()
    key = batch.column("prompt_id")[0].as_py().encode()
    arrow = headers_for(ARROW_CONTENT_TYPE)
    row = int(rng.integers(0, batch.num_rows))

    def one_row(name: str, new_value) -> pa.Table:
        column = batch.column(name).to_pylist()
        column[row] = new_value
        i = batch.schema.get_field_index(name)
        typ = batch.schema.field(name).type
        return batch.set_column(i, pa.field(name, typ), pa.array(column, typ))

    whole = (ids, [])
    only_row = ([ids[row]], ids[:row] + ids[row + 1:])
    if kind == "missing_field":
        value, (bad, good) = encode_arrow(batch.drop_columns(["reward"])), whole
    elif kind == "null_required":
        value, (bad, good) = encode_arrow(one_row("response", None).cast(
            pa.schema([f.with_nullable(True) for f in batch.schema]))), only_row
    elif kind == "wrong_type":
        i = batch.schema.get_field_index("reward")
        value = encode_arrow(batch.set_column(i, "reward", pa.array(["high"] * batch.num_rows)))
        bad, good = whole
    elif kind == "nonfinite_reward":
        value, (bad, good) = encode_arrow(one_row("reward", float("nan"))), only_row
    elif kind == "nonfinite_embedding":
        emb = batch.column("embedding").to_pylist()
        emb[row][int(rng.integers(0, len(emb[row])))] = float("inf")
        i = batch.schema.get_field_index("embedding")
        value = encode_arrow(batch.set_column(i, "embedding", pa.array(emb, batch.schema.field(i).type)))
        bad, good = only_row
    elif kind == "wrong_embedding_dim":
        emb = batch.column("embedding").to_pylist()
        emb[row] = emb[row][:-1]
        i = batch.schema.get_field_index("embedding")
        value = encode_arrow(batch.set_column(i, "embedding", pa.array(emb, pa.list_(pa.float32()))))
        bad, good = only_row
    elif kind == "logprob_length":
        lp = batch.column("behavior_logprobs")[row].as_py()
        value, (bad, good) = encode_arrow(one_row("behavior_logprobs", lp[:-3])), only_row
    elif kind == "negative_policy_version":
        value, (bad, good) = encode_arrow(one_row("policy_version", -1)), only_row
    elif kind == "undecodable":
        value, (bad, good) = rng.bytes(512), whole
    elif kind == "bad_json":
        value = encode_json(batch.slice(0, 2))[:-17]
        return MalformedMessage(kind, MALFORMED_KINDS[kind], value, headers_for(JSON_CONTENT_TYPE), key,
                                ids[:2], [])
    else:  # oversized: valid rollouts padded past the limit through the free-form meta field
        pad = "x" * (max_message_bytes + 1024)
        value, (bad, good) = encode_arrow(one_row("meta", pad)), whole
    return MalformedMessage(kind, MALFORMED_KINDS[kind], value, arrow, key, bad, good)


# ---- `sponge produce` ---------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    parser.add_argument("--topic", default="rollouts", help="topic to send to (created if missing)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions when the topic is created")
    parser.add_argument("--rollouts", type=int, default=10_000, help="number of valid rollouts to send")
    parser.add_argument("--rows-per-message", type=int, default=64,
                        help="rollouts per Kafka message (whole GRPO groups)")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per prompt_id (GRPO group)")
    parser.add_argument("--response-tokens", type=int, default=300, help="mean response length in tokens")
    parser.add_argument("--embedding-dim", type=int, default=DEFAULT_EMBEDDING_DIM, help="embedding width")
    parser.add_argument("--policy-version", type=int, default=0, help="policy_version of every rollout")
    parser.add_argument("--run-id", default="synthetic", help="run_id (and rollout_id prefix)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (ids differ per seed)")
    parser.add_argument("--format", choices=["arrow", "json"], default="arrow", help="message encoding")
    parser.add_argument("--bad-fraction", type=float, default=0.0,
                        help="fraction of messages replaced by malformed ones (each kind in turn)")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                        help="the consumer's size limit (oversized bad messages exceed it)")
    parser.add_argument("--chunk", type=int, default=20_000, help="rollouts generated per step (memory bound)")
    parser.add_argument("--kafka-client", choices=["confluent", "kafka-python"], default=None,
                        help="Kafka client library (default: $SPONGE_KAFKA_CLIENT, else confluent)")


def produce(bootstrap_servers: str, topic: str, rollouts: int, *, seed: int = 0,
            synthetic: SyntheticConfig | None = None, rows_per_message: int = 64,
            content_type: str = ARROW_CONTENT_TYPE, bad_fraction: float = 0.0,
            max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, chunk: int = 20_000,
            progress: bool = False, **kafka_config) -> dict:
    """Send `rollouts` valid rollouts plus malformed messages; returns what was sent.

    Returns {"messages", "good_ids" (set of every valid rollout_id sent, including good
    rows inside partly-bad messages), "bad": [(kind, bad_ids)], "bytes"}.
    """
    from tqdm import tqdm

    from sponge.streams.producer import RolloutProducer

    cfg = synthetic or SyntheticConfig()
    rng = np.random.default_rng(seed + 1_000_003)
    kinds = list(MALFORMED_KINDS)
    good_ids: set[str] = set()
    bad: list[tuple[str, list[str]]] = []
    messages = 0
    with RolloutProducer(bootstrap_servers, topic, rows_per_message=rows_per_message,
                         content_type=content_type, **kafka_config) as producer, \
            tqdm(total=rollouts, unit="rollout", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, rollouts, chunk):
            n = min(chunk, rollouts - start)
            table = synthetic_rollouts(n, seed=seed, config=cfg,
                                       id_prefix=f"{cfg.run_id}-s{seed}-c{start // chunk}")
            messages += producer.send(table)
            good_ids.update(table.column("rollout_id").to_pylist())
            n_bad = int(round(bad_fraction * n / max(1, rows_per_message)))
            for j in range(n_bad):
                kind = kinds[(len(bad)) % len(kinds)]
                extra = synthetic_rollouts(cfg.group_size, seed=seed, config=cfg,
                                           id_prefix=f"{cfg.run_id}-s{seed}-bad{start // chunk}-{j}")
                msg = malformed_message(kind, extra, rng, max_message_bytes)
                producer.send_raw(msg.value, key=msg.key, headers=msg.headers)
                good_ids.update(msg.good_ids)
                bad.append((kind, msg.bad_ids))
                messages += 1
            bar.update(n)
    return {"messages": messages, "good_ids": good_ids, "bad": bad}


def run(args: argparse.Namespace) -> int:
    from sponge.streams.broker import create_topic

    create_topic(args.bootstrap_servers, args.topic, partitions=args.partitions, client=args.kafka_client)
    cfg = SyntheticConfig(embedding_dim=args.embedding_dim, group_size=args.group_size,
                          response_tokens=args.response_tokens, run_id=args.run_id,
                          policy_version=args.policy_version)
    result = produce(args.bootstrap_servers, args.topic, args.rollouts, seed=args.seed, synthetic=cfg,
                     rows_per_message=args.rows_per_message,
                     content_type=ARROW_CONTENT_TYPE if args.format == "arrow" else JSON_CONTENT_TYPE,
                     bad_fraction=args.bad_fraction, max_message_bytes=args.max_message_bytes,
                     chunk=args.chunk, progress=True, client=args.kafka_client)
    kinds: dict[str, int] = {}
    for kind, _ in result["bad"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"sent {result['messages']} messages to {args.topic}: {len(result['good_ids'])} valid rollouts, "
          f"{len(result['bad'])} malformed messages {kinds}")
    return 0
