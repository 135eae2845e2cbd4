"""sponge: streaming data selection and replay curation for reinforcement fine-tuning.

Subpackages:
    sponge.streams    Kafka codec, producer, consumer, dead letters, embedded broker
    sponge.engine     the Parquet/DuckDB rollout store and the ingest service
    sponge.selectors  fully dynamic submodular selection over faiss embeddings
    sponge.trainer    the ReMix trainer with density-ratio replay sampling
"""

__version__ = "0.1.0"
