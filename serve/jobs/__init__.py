"""Durable S3 jobs: spec, store, runner, events, inbox rules, SQS consumer, the event intake, pushes and records."""
