"""The long-running service, `sponge serve`: ingest from Kafka, curate replay per run, serve it over HTTP.

Where things live:

    server.py      ServerConfig (every knob of the parts below) and the process that wires them
    ingest.py      the Kafka consumer loop: decode, validate, dead-letter, write a flush, commit offsets
    curation.py    Curator: runs, retention, the candidates a trainer draws (composes the two below)
    runs.py        the run registry (one record per run, a shared object of the store)
    selection.py   RunSelection: a run's selector (a child process) and its shard merging
    recent.py      RecentRows: a run's recent rows in memory, so candidates need no store read
    shards.py      merging shard solutions into one subset
    worker.py      the curation worker thread between ingest and the curator (batching, backpressure)
    api.py         the HTTP API (runs, candidates, SQL, metrics) and its config
    embedder.py    text embeddings for rollouts that arrive without one
    metrics.py     Prometheus metrics of ingest

A new service knob is a field on the component's dataclass (IngestConfig, CurationConfig, ApiConfig,
DeltaStoreConfig); `sponge.config` turns it into a flag, an environment variable and a config-file key.
"""
