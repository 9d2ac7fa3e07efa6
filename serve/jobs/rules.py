"""Inbox rules: which S3 objects are whose jobs, and the checks that keep one site's objects its own.

An :class:`InboxRule` maps objects under ``s3://{bucket}/{prefix}`` to a site and
an output root; :func:`check_rules` refuses rules that nest across sites;
:func:`specs_for_events` turns object events into the jobs the rules name (the
SQS consumer and the ``POST /v1/events`` push both use it).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Mapping, Sequence

from pydantic import BaseModel, StrictBool, StrictStr, model_validator

from serve.catalogue import load_catalogue
from serve.errors import MrisegError
from serve.inference.resampling import DEFAULT_RESAMPLING_ORDER
from serve.jobs.events import ObjectEvent, volume_events
from serve.jobs.spec import OUTPUT_KINDS, JobSpec
from serve.settings_checks import STRICT_FROZEN, Says, check, setting_names, whole
from serve.storage.s3client import has_dot_segments, parse_s3_uri

log = logging.getLogger(__name__)


_NAMES = Says("a list of names")


class InboxRule(BaseModel):
    """Objects under ``s3://{bucket}/{prefix}`` belong to ``site``; outputs go under ``output_root``."""

    model_config = STRICT_FROZEN

    bucket: StrictStr
    prefix: StrictStr
    site: StrictStr
    output_root: StrictStr
    roi_subset: Annotated[tuple[StrictStr, ...], _NAMES] | None = None  # a string would have become letters
    fast: Annotated[StrictBool, Says("true or false")] = False          # "false" would have been truthy
    outputs: Annotated[tuple[StrictStr, ...], _NAMES] = ("multilabel", "statistics", "preview")
    # the input's spline order (TotalSegmentator's -ro, 0..5)
    resampling_order: Annotated[whole(0, 5), Says(
        f"a whole number from 0 to 5 (the spline order of the input's resampling, TotalSegmentator's -ro; "
        f"default {DEFAULT_RESAMPLING_ORDER})")] = DEFAULT_RESAMPLING_ORDER

    @model_validator(mode="before")
    @classmethod
    def _names_are_strings(cls, d: Any) -> Any:
        if isinstance(d, Mapping) and not all(isinstance(d.get(k), str) for k in _RULE_KEYS if k in d):
            raise ValueError("bucket, prefix, site and output_root must be strings (site not empty)")
        return d

    def matches(self, ev: ObjectEvent) -> bool:
        """The object lies under the inbox prefix, on whole path segments, with no ``.`` or ``..`` segment.

        The input is then read with the intake's own credentials, not through the API's tenancy check, and
        a server that resolves ``..`` in keys would hand over another site's object.
        """
        if ev.bucket != self.bucket or not ev.key.startswith(self.prefix):
            return False
        if self.prefix and not self.prefix.endswith("/") and not ev.key[len(self.prefix):].startswith("/"):
            return False  # prefix "site-a" must not take "site-ab/..."
        return not has_dot_segments(ev.key)

    def spec(self, ev: ObjectEvent) -> JobSpec:
        return JobSpec(ev.uri, self.output_root, self.site, ev.etag, ev.version_id, self.roi_subset, self.fast,
                       self.outputs, self.prefix, self.resampling_order)

    @classmethod
    def from_mapping(cls, d: Any) -> "InboxRule":
        """A rule from config, checked: a typo or a wrong type is an error here, not a silent default.

        Args:
            d: one rule of the ``events`` settings or the rules file.

        Returns:
            The rule, its structure names checked against the catalogue.

        Raises:
            MrisegError: naming the rule's site and the key that is wrong.
        """
        if not isinstance(d, Mapping):
            raise MrisegError(f"events: an inbox rule must be a mapping of {list(setting_names(cls))}")
        d = dict(d)
        missing = [k for k in _RULE_KEYS if k not in d]
        if missing:
            raise MrisegError(f"events: inbox rule {d.get('site', '?')}: missing {missing}; a rule has "
                              f"{list(setting_names(cls))}")
        name = f"events: inbox rule for site {d['site']!r}"
        rule = check(cls, d, name)
        if not rule.site:
            raise MrisegError(f"{name}: bucket, prefix, site and output_root must be strings (site not empty)")
        parse_s3_uri(f"s3://{rule.bucket}/")  # a clear error for an invalid bucket name
        out_bucket, out_key = parse_s3_uri(rule.output_root.rstrip("/") + "/")
        if _inbox(out_bucket, out_key).startswith(_inbox(rule.bucket, rule.prefix)):
            raise MrisegError(f"{name}: output_root lies inside the inbox, so every output would be segmented "
                              f"again; put outputs outside {rule.prefix!r}")
        changes: dict[str, Any] = {}
        if rule.roi_subset is not None:
            changes["roi_subset"] = tuple(load_catalogue().validate_structures(list(rule.roi_subset)) or ())
            if not changes["roi_subset"]:
                raise MrisegError(f"{name}: roi_subset names no structure; leave it out for all")
        bad = [o for o in rule.outputs if o not in OUTPUT_KINDS]
        if bad or not rule.outputs:
            raise MrisegError(f"{name}: outputs must name some of {list(OUTPUT_KINDS)}, not {list(rule.outputs)}")
        return rule.model_copy(update=changes) if changes else rule


_RULE_KEYS = ("bucket", "prefix", "site", "output_root")


def _inbox(bucket: str, prefix: str) -> str:
    """``bucket/prefix/`` on whole segments ("" is the whole bucket), for nesting checks."""
    return f"{bucket}/{prefix}" if not prefix or prefix.endswith("/") else f"{bucket}/{prefix}/"


def check_rules(rules: Sequence[InboxRule]) -> list[InboxRule]:
    """Refuse rules that would hand one site's objects to another.

    Inputs are read with the intake's own credentials, so the rules are the tenancy boundary: an inbox
    of one site inside another site's would let either push (or, first rule first, be sent) the other's
    objects, and outputs written inside any inbox would be segmented again as that inbox's site's.
    """
    for i, a in enumerate(rules):
        for b in rules[i + 1:]:
            ia, ib = _inbox(a.bucket, a.prefix), _inbox(b.bucket, b.prefix)
            if a.site != b.site and (ia.startswith(ib) or ib.startswith(ia)):
                raise MrisegError(f"events: the inboxes of sites {a.site!r} ({a.prefix!r}) and {b.site!r} "
                                  f"({b.prefix!r}) in bucket {a.bucket!r} nest; give each site a prefix of its own")
    for r in rules:
        out_bucket, out_key = parse_s3_uri(r.output_root.rstrip("/") + "/")
        for other in rules:
            if _inbox(out_bucket, out_key).startswith(_inbox(other.bucket, other.prefix)):
                raise MrisegError(f"events: site {r.site!r}'s output_root lies inside site {other.site!r}'s "
                                  f"inbox ({other.prefix!r}), where every output would be segmented again; put "
                                  f"outputs outside the inboxes")
    return list(rules)


def prefixes_nest(a: str, b: str) -> bool:
    """Whether two ``s3://`` prefixes nest: equal, or one inside the other, on whole path segments.

    Args:
        a: an ``s3://bucket/prefix`` (``s3://b/x`` and ``s3://b/x/`` are the same prefix).
        b: another.

    Returns:
        True if an object could lie under both.
    """
    ia, ib = _inbox(*parse_s3_uri(a)), _inbox(*parse_s3_uri(b))
    return ia.startswith(ib) or ib.startswith(ia)


def specs_for_events(events: Sequence[ObjectEvent], rules: Sequence[InboxRule]) -> tuple[list[JobSpec], int]:
    """Jobs for the volume events that fall in an inbox rule; also how many events were ignored.

    The HTTP push endpoint (S3 ``Records[]``, SNS, EventBridge bodies) uses this with
    :func:`serve.jobs.events.parse_message`, then submits each spec like the consumer does."""
    vols = volume_events(events)
    specs, ignored = [], len(events) - len(vols)
    for ev in vols:
        rule = next((r for r in rules if r.matches(ev)), None)
        if rule is None:
            ignored += 1  # not an inbox we serve (e.g. our own outbox in the same bucket)
            if has_dot_segments(ev.key):
                log.warning("ignored an event for a key with '.' or '..' segments in bucket %s", ev.bucket)
            continue
        spec = rule.spec(ev)
        try:
            spec.output_prefix  # the key must name a case folder; one with control characters cannot
        except MrisegError:
            ignored += 1  # a job without an output prefix could never record why it failed
            log.warning("ignored an event in bucket %s: its key cannot name an output folder (control "
                        "characters, unpaired surrogates or over 1024 bytes)", ev.bucket[:63])
            continue
        specs.append(spec)
    return specs, ignored

