"""Durable S3 jobs: spec, store, runner, events, inbox rules, SQS consumer, pushes and records."""
