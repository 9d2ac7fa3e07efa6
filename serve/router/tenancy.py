"""Sites, their API keys and the S3 prefixes each may touch.

The tenants file (YAML or JSON) is given by path in the app args or in the
``MRISEG_TENANTS_FILE`` environment variable; its content may instead come
whole from ``MRISEG_TENANTS_JSON`` (e.g. a Kubernetes Secret). Keys may be
written in clear (``keys``) or as SHA-256 hex digests (``key_sha256``); only
the digests are kept in memory. A file is re-read when its content changes
(looked at, at most every :data:`RELOAD_INTERVAL_S`, on authentication); a
change that cannot be read or is refused leaves the tenants in force::

    sites:
      site-a:
        key_sha256: ["9f86d0..."]
        prefixes: ["s3://consortium/site-a/"]
        max_concurrent_jobs: 8
        requests_per_second: 50     # API requests, averaged (429 beyond; 0: unlimited)
        burst: 200
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping

import yaml
from pydantic import BaseModel, StrictStr

from serve.audit import audit
from serve.errors import AuthenticationError, ForbiddenError, MrisegError
from serve.settings_checks import STRICT_FROZEN, Says, check, number, setting_names, whole
from serve.storage.s3client import has_dot_segments, parse_s3_uri

log = logging.getLogger(__name__)

TENANTS_FILE_ENV = "MRISEG_TENANTS_FILE"
TENANTS_JSON_ENV = "MRISEG_TENANTS_JSON"
#: the least seconds between two looks at the tenants file for changes (a revoked key's grace)
RELOAD_INTERVAL_S = 5.0


@dataclass(frozen=True)
class Site:
    """One consortium member."""

    name: str
    prefixes: tuple[str, ...]  # "s3://bucket/prefix/" the site may read and write
    max_concurrent_jobs: int = 4
    requests_per_second: float = 50.0  # API request rate (token bucket); 0: unlimited
    burst: int = 200

    def owns(self, uri: str) -> bool:
        """True if ``uri`` lies under one of the site's prefixes (whole path segments only)."""
        bucket, key = parse_s3_uri(uri)
        if has_dot_segments(key):
            return False
        for prefix in self.prefixes:
            pbucket, pkey = prefix_key(prefix)
            if bucket == pbucket and key.startswith(pkey):
                return True
        return False


_STRINGS = Says("a list of strings")


class SiteSettings(BaseModel):
    """One site's entry in the tenants file, as written there (its keys in clear or as digests)."""

    model_config = STRICT_FROZEN

    prefixes: Annotated[tuple[StrictStr, ...], _STRINGS] = ()  # a string would have become letters
    keys: Annotated[tuple[StrictStr, ...], _STRINGS] = ()
    key_sha256: Annotated[tuple[StrictStr, ...], _STRINGS] = ()
    max_concurrent_jobs: whole(1) = Site.max_concurrent_jobs
    requests_per_second: number(0) = Site.requests_per_second
    burst: whole(1) = Site.burst  # 0 would lock the site out for good


SITE_SETTINGS = tuple(setting_names(SiteSettings))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _site_from_mapping(name: str, cfg: Any) -> tuple[Site, list[bytes]]:
    """One site's settings, checked; and the digests of its keys."""
    cfg = {} if cfg is None else cfg
    if isinstance(cfg, Mapping):  # an empty list in YAML is written as nothing at all
        cfg = {k: v for k, v in cfg.items() if not (k in ("prefixes", "keys", "key_sha256") and v is None)}
    settings = check(SiteSettings, cfg, f"tenants: site {name}")
    for p in settings.prefixes:
        _, key = parse_s3_uri(p)  # raises a clear error for a non-s3 prefix
        if has_dot_segments(key):  # Site.owns never matches under it: a prefix that grants nothing is a typo
            raise MrisegError(f"tenants: site {name}: prefix {p!r} has a '.' or '..' path segment; "
                              f"write the prefix as it is stored")
    site = Site(name, settings.prefixes, settings.max_concurrent_jobs, settings.requests_per_second, settings.burst)
    digests = []
    for k in settings.keys:
        if len(k) < 16:
            raise MrisegError(f"tenants: site {name}: API keys must be at least 16 characters")
        digests.append(hash_key(k))
    for h in settings.key_sha256:
        try:
            d = bytes.fromhex(h)
        except ValueError:
            d = b""
        if len(d) != 32:
            raise MrisegError(f"tenants: site {name}: key_sha256 entries must be 64 hex characters")
        digests.append(d)
    return site, digests


def prefix_key(prefix: str) -> tuple[str, str]:
    """A prefix as :meth:`Site.owns` matches it: ``(bucket, key)``, the key ``""`` or ending in ``/``.

    Args:
        prefix: an ``s3://bucket/key-prefix`` URI (``s3://b/x`` and ``s3://b/x/`` are the same prefix).

    Returns:
        The bucket and the key prefix on whole path segments.
    """
    bucket, key = parse_s3_uri(prefix)
    return bucket, key if not key or key.endswith("/") else key + "/"


def _check_disjoint(sites: Iterable[Site]) -> None:
    """Refuse two sites whose prefixes overlap (one equal to or inside the other).

    An object under both would belong to either site: each could read, overwrite and
    publish into the other's data, and which site an event's object belongs to
    would depend on rule order. One site's own prefixes may nest.
    """
    seen: list[tuple[str, str, str, str]] = []  # (bucket, key prefix, site, prefix as written)
    for site in sites:
        for prefix in site.prefixes:
            bucket, key = prefix_key(prefix)
            for other_bucket, other_key, other, other_prefix in seen:
                if other != site.name and bucket == other_bucket and (key.startswith(other_key)
                                                                      or other_key.startswith(key)):
                    raise MrisegError(f"tenants: the prefixes of sites {other} ({other_prefix}) and {site.name} "
                                      f"({prefix}) overlap, so objects there would belong to both; give each "
                                      f"site prefixes of its own that do not nest")
            seen.append((bucket, key, site.name, prefix))


def hash_key(key: str) -> bytes:
    """SHA-256 digest of an API key, the only form kept in memory."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class _Snapshot:
    """One version of the tenants: replaced whole on reload, so a reader never sees half of two."""

    sites: Mapping[str, Site]
    digests: tuple[tuple[bytes, str], ...]  # a sequence, so authentication compares every digest


class Tenancy:
    """Authenticates API keys to sites and checks S3 access.

    Loaded from a file, it re-reads the file when its content changes (checked at
    most every ``reload_interval_s``, on the next authentication), so a revoked key
    or a removed site is refused within seconds without a router restart. A file
    that becomes unreadable or invalid leaves the last good tenants in force.
    """

    def __init__(self, sites: Iterable[Site], key_digests: Mapping[bytes, str]):
        by_name = {s.name: s for s in sites}
        unknown = {v for v in key_digests.values() if v not in by_name}
        if unknown:
            raise MrisegError(f"tenants: keys refer to undefined site(s) {sorted(unknown)}")
        self._state = _Snapshot(by_name, tuple(key_digests.items()))
        self._path: Path | None = None  # the file re-read on change; None: fixed (a mapping or the env JSON)
        self.reload_interval_s = RELOAD_INTERVAL_S
        self._fingerprint = b""   # SHA-256 of the content in force
        self._refused = b""       # SHA-256 of the last content refused, so its error is logged once
        self._next_check = 0.0
        self._lock = threading.Lock()

    @property
    def sites(self) -> Mapping[str, Site]:
        """The sites now in force, by name."""
        return self._state.sites

    # -- loading ------------------------------------------------------------
    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "Tenancy":
        if not isinstance(raw, Mapping) or not isinstance(raw.get("sites"), Mapping):
            raise MrisegError("tenants: expected a mapping with a 'sites' mapping of site name -> settings")
        sites, digests = [], {}
        for name, cfg in raw["sites"].items():
            site, site_digests = _site_from_mapping(str(name), cfg)
            sites.append(site)
            for d in site_digests:
                if digests.get(d, site.name) != site.name:
                    # a key must name one site: authentication would otherwise pick either
                    raise MrisegError(f"tenants: sites {digests[d]} and {site.name} share an API key; "
                                      f"give each site its own")
                digests[d] = site.name
        _check_disjoint(sites)
        return cls(sites, digests)

    @staticmethod
    def _read(p: Path) -> bytes:
        try:
            return p.read_bytes()
        except OSError as e:
            raise MrisegError(f"tenants file {p} cannot be read ({e.strerror}); set tenants_file or "
                              f"{TENANTS_FILE_ENV} to an existing YAML/JSON file") from e

    @classmethod
    def _parse(cls, p: Path, data: bytes) -> "Tenancy":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MrisegError(f"tenants file {p} is not UTF-8 text") from e
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MrisegError(f"tenants file {p} is not valid YAML/JSON ({_first_line(e)})") from e
        return cls.from_mapping(raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike, reload_interval_s: float | None = None) -> "Tenancy":
        """The tenants in a YAML/JSON file, re-read when it changes.

        Args:
            path: the tenants file.
            reload_interval_s: the least time between two looks at the file (default
                :data:`RELOAD_INTERVAL_S`).

        Returns:
            The tenants, which :meth:`refresh` keeps up to date with the file.
        """
        p = Path(path)
        data = cls._read(p)
        t = cls._parse(p, data)
        t._path, t._fingerprint = p, hashlib.sha256(data).digest()
        t.reload_interval_s = RELOAD_INTERVAL_S if reload_interval_s is None else float(reload_interval_s)
        t._next_check = time.monotonic() + t.reload_interval_s
        return t

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, reload_interval_s: float | None = None) -> "Tenancy":
        """From ``path``, else ``$MRISEG_TENANTS_FILE``, else ``$MRISEG_TENANTS_JSON``.

        Args:
            path: the tenants file; None to look at the environment.
            reload_interval_s: for a file, the least time between two looks at it.

        Returns:
            The tenants; from a file, re-read when it changes (the environment's JSON is fixed).
        """
        path = path or os.environ.get(TENANTS_FILE_ENV)
        if path:
            return cls.from_file(path, reload_interval_s)
        if os.environ.get(TENANTS_JSON_ENV):
            try:
                raw = json.loads(os.environ[TENANTS_JSON_ENV])
            except ValueError as e:  # the message quotes no content: it may hold keys
                raise MrisegError(f"{TENANTS_JSON_ENV} is not valid JSON (line {getattr(e, 'lineno', '?')})") from e
            return cls.from_mapping(raw)
        raise MrisegError(f"no tenants configured: pass tenants_file in the app args or set "
                          f"{TENANTS_FILE_ENV} / {TENANTS_JSON_ENV}")

    def refresh(self) -> bool:
        """Re-read the tenants file if ``reload_interval_s`` has passed since the last look and it changed.

        A file that cannot be read or is refused (any check of loading) leaves the
        tenants in force as they are: a broken edit must neither open access nor stop
        the router. Its error is logged once per content.

        Returns:
            True when new tenants took effect.
        """
        now = time.monotonic()
        if self._path is None or now < self._next_check or not self._lock.acquire(blocking=False):
            return False
        try:
            self._next_check = now + self.reload_interval_s
            try:
                data = self._read(self._path)
            except MrisegError as e:
                return self._refuse(b"unreadable", e)
            fingerprint = hashlib.sha256(data).digest()
            if fingerprint in (self._fingerprint, self._refused):
                return False
            try:
                new = self._parse(self._path, data)
            except MrisegError as e:
                return self._refuse(fingerprint, e)
            old = self._state
            self._state, self._fingerprint, self._refused = new._state, fingerprint, b""
        finally:
            self._lock.release()
        keys_before = {d for d, _ in old.digests}
        keys_after = {d for d, _ in new._state.digests}
        audit("tenants.reloaded", sites=len(new.sites), added=sorted(set(new.sites) - set(old.sites)),
              removed=sorted(set(old.sites) - set(new.sites)), keys_added=len(keys_after - keys_before),
              keys_removed=len(keys_before - keys_after))
        return True

    def _refuse(self, fingerprint: bytes, e: MrisegError) -> bool:
        if fingerprint != self._refused:
            self._refused = fingerprint
            log.error("the tenants file changed but cannot be used: %s. The tenants loaded before stay in "
                      "force until the file is fixed", e.message)
        return False

    # -- checks -------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> Site:
        """The site owning ``api_key``; 401 otherwise. Compares every digest in constant time.

        Looks at the tenants file first (:meth:`refresh`), so a key removed from it is refused
        within ``reload_interval_s``.
        """
        self.refresh()
        if not api_key:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        presented = hash_key(api_key)
        state = self._state  # one version for the whole check, whatever a reload does meanwhile
        found = None
        for digest, site in state.digests:
            if hmac.compare_digest(digest, presented):
                found = site
        if found is None:
            raise AuthenticationError("API key not recognised; ask the consortium operator for your site's key")
        return state.sites[found]

    def check_access(self, site: Site, uri: str, action: str) -> None:
        """403 unless ``uri`` lies under one of ``site``'s prefixes. Logs the refusal without the key."""
        if site.owns(uri):
            return
        bucket, _ = parse_s3_uri(uri)
        # Object keys can carry patient identifiers: log the bucket only.
        log.warning("refused %s by site %s outside its prefixes (bucket %s)", action, site.name, bucket)
        raise ForbiddenError(f"site {site.name} may not {action} this object: it is outside the site's "
                             f"configured prefixes")
