"""SQS plumbing: the client, and setting up a queue with its dead-letter queue and the S3 notifications.

The consumer (:mod:`serve.jobs.consumer`) polls through :func:`make_sqs_client`;
:func:`create_queue_with_dlq` and :func:`configure_notifications` set up what
it polls (moto in tests, AWS in production).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import boto3
from botocore.config import Config

from serve.storage.s3client import S3Settings

#: SQS's longest visibility timeout (12 hours)
MAX_VISIBILITY_S = 43200


def make_sqs_client(settings: S3Settings):
    """boto3 SQS client from the same connection settings shape as S3."""
    kwargs: dict[str, Any] = {"region_name": settings.region, "config": Config(
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout_s, read_timeout=max(settings.read_timeout_s, 30.0))}
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.access_key_id:
        kwargs["aws_access_key_id"] = settings.access_key_id
        kwargs["aws_secret_access_key"] = settings.secret_access_key
    return boto3.session.Session().client("sqs", **kwargs)


def create_queue_with_dlq(sqs, name: str, max_receives: int = 5, visibility_timeout_s: int = 120) -> tuple[str, str]:
    """A queue whose messages move to ``{name}-dlq`` after ``max_receives`` receives; returns both URLs."""
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    url = sqs.create_queue(QueueName=name, Attributes={
        "VisibilityTimeout": str(visibility_timeout_s),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receives)}),
    })["QueueUrl"]
    return url, dlq_url


def configure_notifications(s3, sqs, bucket: str, queue_url: str, prefixes: Sequence[str]) -> None:
    """Send ``s3:ObjectCreated:*`` of each inbox prefix in ``bucket`` to the queue (replaces the bucket's config)."""
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    configs = [{"Id": f"mriseg-{i}", "QueueArn": arn, "Events": ["s3:ObjectCreated:*"],
                "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": p}]}}}
               for i, p in enumerate(prefixes)]
    s3.put_bucket_notification_configuration(Bucket=bucket,
                                             NotificationConfiguration={"QueueConfigurations": configs})
