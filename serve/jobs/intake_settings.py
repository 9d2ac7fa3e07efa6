"""The event intake's settings: the ``events`` app arg, the environment, the inbox rules and their checks.

:meth:`IntakeSettings.from_mapping` reads the ``events`` app arg (with the
``MRISEG_EVENTS_*`` environment fallbacks and an optional rules file) and,
given the tenants, refuses rules and a job-record prefix the tenants file does
not back. The tenants are read through :class:`Tenancy`, the shape of
:class:`serve.router.tenancy.Tenancy` these checks use (the router sits above
this layer). :class:`serve.jobs.intake.IntakeWorker` runs what they describe.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Mapping, Protocol, Sequence

import yaml
from pydantic import BaseModel, Field, StrictStr

from serve.errors import MrisegError
from serve.jobs.consumer import ConsumerConfig
from serve.jobs.rules import InboxRule, check_rules, prefixes_nest
from serve.settings_checks import STRICT, Says, check, number, setting_names, whole
from serve.storage.s3client import S3Settings, parse_s3_uri

log = logging.getLogger(__name__)

#: environment fallbacks, so Kubernetes can fill them from a ConfigMap
ENV = {"queue_url": "MRISEG_EVENTS_QUEUE_URL", "dlq_url": "MRISEG_EVENTS_DLQ_URL",
       "rules_file": "MRISEG_EVENTS_RULES_FILE", "jobs": "MRISEG_EVENTS_JOBS_PREFIX"}

#: settings of earlier versions that are ignored (with a warning) rather than refused, so a config still
#: naming them starts; the intake reaches the router by Ray handle, without the sites' API keys
RETIRED_SETTINGS = ("site_keys", "site_keys_file", "api_url")


_CONCURRENCY, _LEASE_S, _MAX_BYTES = whole(1), number(1), whole(1)


class Site(Protocol):
    """One site as the checks read it (:class:`serve.router.tenancy.Site`)."""

    name: str
    prefixes: tuple[str, ...]

    def owns(self, uri: str) -> bool:
        """True if ``uri`` lies under one of the site's prefixes."""


class Tenancy(Protocol):
    """The tenants as the checks read them (:class:`serve.router.tenancy.Tenancy`)."""

    sites: Mapping[str, Site]


class EventsArg(BaseModel):
    """The ``events`` app arg as written in a Serve config (see :meth:`IntakeSettings.from_mapping`)."""

    model_config = STRICT

    jobs: StrictStr = ""
    rules: Annotated[list, Says("a list of inbox rules")] | None = None
    rules_file: Annotated[StrictStr, Says("a file path")] | None = None
    queue_url: StrictStr | None = None
    dlq_url: StrictStr | None = None
    sqs: Annotated[dict, Says("a mapping of SQS connection settings")] | None = None
    sqs_options: Annotated[dict, Says("a mapping of SQS settings")] | None = None
    concurrency: _CONCURRENCY = 2
    lease_s: _LEASE_S = 300.0
    max_bytes: _MAX_BYTES = 1 << 30
    record_key_file: Annotated[StrictStr, Says("a file path")] | None = None


EVENTS_SETTINGS = tuple(setting_names(EventsArg))


def without_retired(d: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``events`` app arg without :data:`RETIRED_SETTINGS`, with a warning naming those it held.

    Args:
        d: the ``events`` app arg as written.

    Returns:
        A copy without the retired settings.
    """
    d = dict(d or {})
    retired = sorted(k for k in RETIRED_SETTINGS if k in d)
    if retired:
        log.warning("events: setting(s) %s are no longer used: the intake reaches the router by Ray handle, "
                    "naming each job's site, without API keys; remove them (and any site keys file)",
                    ", ".join(retired))
        for k in retired:
            del d[k]
    return d


class IntakeSettings(BaseModel):
    """The event intake's settings, resolved from the ``events`` app arg and the environment (``ENV``)."""

    model_config = STRICT

    jobs: StrictStr = ""                     # s3:// prefix of the durable job records
    rules: list[InboxRule] = Field(default_factory=list)
    queue: ConsumerConfig | None = None      # None: pushed events only
    concurrency: _CONCURRENCY = 2             # event jobs in flight per replica (all sites), and as many SQS pollers
    lease_s: _LEASE_S = 300.0
    max_bytes: _MAX_BYTES = 1 << 30
    record_key_file: StrictStr | None = None  # the key that signs job records; None: $MRISEG_RECORD_KEY_FILE
    s3: S3Settings = Field(default_factory=S3Settings)

    @property
    def configured(self) -> bool:
        """False when no job-record prefix is set: the deployment then idles and pushes get a 404."""
        return bool(self.jobs)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], s3: Mapping[str, Any] | None = None,
                     tenancy: "Tenancy | None" = None) -> "IntakeSettings":
        """Parse the ``events`` app arg. Without ``jobs`` (or ``MRISEG_EVENTS_JOBS_PREFIX``) intake is off
        and the rules file is not read, so one Serve config fits clusters with and without it.

        Args:
            d: the ``events`` app arg.
            s3: the app's ``s3`` settings.
            tenancy: the tenants; given, every rule is checked against them (:func:`check_rules_in_tenancy`)
                and the ``jobs`` prefix must lie outside every site's prefixes (:func:`check_jobs_prefix`).

        Returns:
            The checked settings.
        """
        d = without_retired(d)
        for k, var in ENV.items():
            if not d.get(k) and os.environ.get(var):
                d[k] = os.environ[var]
        if not d.get("jobs"):
            return cls(s3=S3Settings.from_mapping(s3))
        for k in ("rules_file", "record_key_file"):  # "" is unset; a pathlib.Path is a path
            if d.get(k) == "":
                d[k] = None
            elif isinstance(d.get(k), os.PathLike):
                d[k] = str(d[k])
        arg = check(EventsArg, d, "events")
        rules = list(arg.rules or [])
        try:
            if arg.rules_file:
                rules += _listed(_read_json_or_yaml(arg.rules_file), "the rules file")
        except OSError as e:
            raise MrisegError(f"events: cannot read {e.filename}: {e.strerror}") from e
        except (ValueError, UnicodeDecodeError) as e:  # JSON and YAML parse errors
            raise MrisegError(f"events: the rules file is not valid JSON/YAML ({type(e).__name__})") from e
        parsed = check_rules([InboxRule.from_mapping(r) for r in rules])
        parse_s3_uri(arg.jobs.rstrip("/") + "/")  # a clear error for a jobs prefix that is not s3://
        if tenancy is not None:
            check_rules_in_tenancy(parsed, tenancy)
            check_jobs_prefix(arg.jobs, tenancy)
        for r in parsed:
            if "per_structure" in r.outputs:  # the router hands back the multilabel, statistics and preview only
                raise MrisegError(f"events: inbox rule for site {r.site!r}: outputs 'per_structure' cannot be made "
                                  f"for event jobs in the cluster; 'multilabel' holds every structure (its label "
                                  f"table names them)")
        queue = None
        if arg.queue_url:
            queue = ConsumerConfig.from_mapping({**(arg.sqs_options or {}), "queue_url": arg.queue_url,
                                                 "dlq_url": arg.dlq_url, "sqs": arg.sqs or s3 or {}, "rules": rules})
        return cls(jobs=arg.jobs, rules=parsed, queue=queue, concurrency=arg.concurrency, lease_s=arg.lease_s,
                   max_bytes=arg.max_bytes, record_key_file=arg.record_key_file, s3=S3Settings.from_mapping(s3))

    def rules_for(self, site: str) -> list[InboxRule]:
        """The inboxes a site may push events for (its own only)."""
        return [r for r in self.rules if r.site == site]


def check_jobs_prefix(jobs: str, tenancy: "Tenancy") -> None:
    """Refuse a job-record prefix that any site's prefix contains, equals or lies inside.

    The intake trusts what it finds there (held pushes, job claims); a site that can
    write there could forge them and have the intake read another site's objects or
    block its jobs.

    Args:
        jobs: the ``events.jobs`` prefix.
        tenancy: the tenants loaded from the tenants file.

    Raises:
        MrisegError: naming the site and its overlapping prefix.
    """
    holders = [(site.name, p) for site in tenancy.sites.values() for p in site.prefixes if prefixes_nest(p, jobs)]
    if holders:
        site, prefix = holders[0]
        raise MrisegError(f"events: the job-record prefix {jobs} overlaps site {site!r}'s prefix {prefix} in the "
                          f"tenants file, so that site could write the records the intake trusts; put events.jobs "
                          f"(MRISEG_EVENTS_JOBS_PREFIX) where no site's prefixes reach, e.g. a bucket of its own")


def check_rules_in_tenancy(rules: Sequence[InboxRule], tenancy: "Tenancy") -> None:
    """Refuse inbox rules the tenants file does not back.

    The intake reads inboxes and writes outputs with its own credentials, not through the
    API's prefix checks, so a rule is itself a grant: an inbox or output root outside its
    site's prefixes would hand the site (or the site's outputs) data of another.

    Args:
        rules: the parsed inbox rules.
        tenancy: the tenants loaded from the tenants file.

    Raises:
        MrisegError: naming the rule's site and what lies outside: a site that is not in the
            tenants file, an inbox, or ``{output_root}/{site}/`` (where its outputs go).
    """
    for r in rules:
        name = f"events: inbox rule for site {r.site!r}"
        site = tenancy.sites.get(r.site)
        if site is None:
            raise MrisegError(f"{name}: the tenants file has no such site (its sites: {sorted(tenancy.sites)}); "
                              f"name a site of the tenants file")
        inbox = f"s3://{r.bucket}/{r.prefix}"
        if not site.owns(inbox if not r.prefix or inbox.endswith("/") else inbox + "/"):
            raise MrisegError(f"{name}: the inbox {inbox} is not inside the site's prefixes in the tenants file "
                              f"({', '.join(site.prefixes)}); give the site that prefix, or the rule one inside "
                              f"its prefixes")
        outputs = f"{r.output_root.rstrip('/')}/{r.site}/"
        if not site.owns(outputs):
            raise MrisegError(f"{name}: its outputs would go under {outputs}, which is not inside the site's "
                              f"prefixes in the tenants file ({', '.join(site.prefixes)}); choose an output_root "
                              f"whose {{output_root}}/{r.site}/ lies inside them")


def _listed(value: Any, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MrisegError(f"events: {what} must be a list of inbox rules")
    return list(value)


def _read_json_or_yaml(path: str | os.PathLike) -> Any:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError("not YAML") from e
    return json.loads(text)
