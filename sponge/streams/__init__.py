"""Kafka plumbing: message codec, producer, consumer, dead letters and the embedded broker."""
