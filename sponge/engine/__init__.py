"""The rollout store (Parquet segments + DuckDB views) and the ingest service."""
