"""Durable S3 jobs: spec, store, runner, events, SQS consumer, pushes and records."""
