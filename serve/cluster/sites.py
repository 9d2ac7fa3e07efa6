"""The sites of a local stack (``mriseg up --sites``/``--tenants``): names, prefixes, tenants file, event rules.

Every site gets an API key, an S3 prefix ``s3://mriseg/<site>/`` (inbox, outbox) and, with the
embedded S3, keys limited to that prefix; :mod:`serve.cluster.up` makes them and starts the stack.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from serve.errors import MrisegError

LOCAL_SITE = "local"
LOCAL_BUCKET = "mriseg"
#: the job records (held pushes, job claims): outside every site's prefix, which a site's S3 keys reach;
#: no site can be named "_jobs" (:data:`SITE_NAME`)
JOBS_PREFIX = f"s3://{LOCAL_BUCKET}/_jobs/"
#: a site name: lower-case letters, digits and '-', starting with a letter or digit (it is an S3 key segment)
SITE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
#: the per-site settings ``--tenants FILE`` may give; keys and prefixes are ``mriseg up``'s to make
SITE_SPEC_SETTINGS = ("max_concurrent_jobs", "requests_per_second", "burst")


@dataclass
class LocalSite:
    """One site of a local stack: its API key, its S3 prefix and its own S3 keys."""

    name: str
    api_key: str
    prefix: str                      # s3://mriseg/<site>/, all the site may touch
    s3: dict | None = None           # S3Settings fields with the site's own keys (None without the embedded S3)

    @property
    def inbox(self) -> str:
        """Where the site puts volumes to be segmented when pushed."""
        return self.prefix + "inbox/"

    @property
    def outbox(self) -> str:
        """Where the results of its inbox's volumes land (``<outbox><site>/<case>/``)."""
        return self.prefix + "outbox/"


def check_site_names(names: Sequence[str]) -> list[str]:
    """``names`` as site names, checked: each a valid S3 key segment, none twice.

    Args:
        names: the site names (e.g. ``--sites a,b`` split at the commas).

    Returns:
        The names, in order; a :class:`MrisegError` saying what is wrong otherwise.
    """
    names = [str(n).strip() for n in names]
    if not names or not all(names):
        raise MrisegError("give at least one site name, e.g. --sites site-a,site-b")
    for n in names:
        if not SITE_NAME.fullmatch(n):
            raise MrisegError(f"site name {n[:80]!r}: use lower-case letters, digits and '-', starting with a "
                              f"letter or digit, at most 63 characters")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MrisegError(f"site(s) {dup} named twice; give each site once")
    return names


def load_site_specs(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The sites of a ``--tenants FILE``: ``sites:`` mapping each name to optional settings.

    The settings are :data:`SITE_SPEC_SETTINGS` (a site's job limit and API rate); ``mriseg up``
    makes every site's API key, prefix and S3 keys itself, so the file holds none.

    Args:
        path: a YAML or JSON file, e.g. ``sites: {site-a: {max_concurrent_jobs: 4}, site-b: {}}``.

    Returns:
        Site name -> its settings; a :class:`MrisegError` saying what to change otherwise.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MrisegError(f"--tenants {path}: cannot be read ({e.strerror})") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MrisegError(f"--tenants {path}: not valid YAML/JSON ({type(e).__name__})") from e
    if not isinstance(raw, Mapping) or not isinstance(raw.get("sites"), Mapping) or not raw["sites"]:
        raise MrisegError(f"--tenants {path}: expected 'sites:' mapping each site name to its settings "
                          f"({', '.join(SITE_SPEC_SETTINGS)}), e.g. sites: {{site-a: {{}}, site-b: {{}}}}")
    given = {str(k): v for k, v in raw["sites"].items()}  # YAML may read a name like 2024 as a number
    specs: dict[str, dict[str, Any]] = {}
    for name in check_site_names(list(given)):
        cfg = given[name] or {}
        if not isinstance(cfg, Mapping):
            raise MrisegError(f"--tenants {path}: site {name}: expected a mapping of settings")
        unknown = sorted(str(k) for k in cfg if k not in SITE_SPEC_SETTINGS)
        if unknown:
            raise MrisegError(f"--tenants {path}: site {name}: {unknown} cannot be set here (mriseg up makes each "
                              f"site's API key, prefix and S3 keys); known: {', '.join(SITE_SPEC_SETTINGS)}")
        specs[name] = dict(cfg)
    return specs


def site_prefix(site: str) -> str:
    """The S3 prefix a local stack gives ``site``."""
    return f"s3://{LOCAL_BUCKET}/{site}/"


def write_tenants(path: Path, api_keys: str | Mapping[str, str],
                  settings: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """A tenants file holding only the keys' digests, each site with its prefix ``s3://mriseg/<site>/``.

    Args:
        path: where to write it.
        api_keys: site name -> its API key; one string is the key of the one site ``local``.
        settings: site name -> extra settings (:data:`SITE_SPEC_SETTINGS`) for the tenants file.

    Returns:
        ``path``.
    """
    keys = {LOCAL_SITE: api_keys} if isinstance(api_keys, str) else dict(api_keys)
    doc = {"sites": {site: {"key_sha256": [hashlib.sha256(key.encode()).hexdigest()],
                            "prefixes": [site_prefix(site)],
                            "max_concurrent_jobs": 8, **dict((settings or {}).get(site) or {})}
                     for site, key in keys.items()}}
    path.write_text(yaml.safe_dump(doc))
    return path


def local_events(sites: Sequence[str]) -> dict[str, Any]:
    """Event intake for the embedded default: volumes pushed for ``s3://{bucket}/{site}/inbox/``
    are segmented into ``s3://{bucket}/{site}/outbox/{site}/{case}/``; the job records lie in
    :data:`JOBS_PREFIX`, outside every site's prefix.

    Args:
        sites: the stack's site names.

    Returns:
        The ``events`` settings. They hold no API key: the intake runs each job on the router by Ray
        handle, as the rule's site.
    """
    return {"jobs": JOBS_PREFIX,
            "rules": [{"bucket": LOCAL_BUCKET, "prefix": f"{site}/inbox/", "site": site,
                       "output_root": site_prefix(site) + "outbox"} for site in sites]}
