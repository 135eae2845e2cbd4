"""sponge: streaming data selection and replay curation for reinforcement fine-tuning.

Rooms, bottom up (each imports only the ones above it):
    sponge.record        the rollout record: schema, validation
    sponge.contract      the trainer <-> replay contract (ReplaySource, column lists); sponge.groups: advantages
    sponge.streams       Kafka codec, producer, consumer, dead letters, embedded broker
    sponge.store         the rollout store (Delta Lake tables) and read-only SQL over it
    sponge.selectors     fully dynamic submodular selection over faiss embeddings
    sponge.service       `sponge serve`: ingest, curation per run, the HTTP API
    sponge.client        what a trainer imports to use the service (ServiceReplaySource)
    sponge.trainer       the ReMix trainer with density-ratio replay sampling
    sponge.integrations  replay for TRL and TorchRL
"""

__version__ = "0.1.0"
