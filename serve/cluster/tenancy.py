"""Sites, their API keys and the S3 prefixes each may touch.

The tenants file (YAML or JSON) is given by path in the app args or in the
``MRISEG_TENANTS_FILE`` environment variable; its content may instead come
whole from ``MRISEG_TENANTS_JSON`` (e.g. a Kubernetes Secret). Keys may be
written in clear (``keys``) or as SHA-256 hex digests (``key_sha256``); only
the digests are kept in memory::

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from serve.errors import AuthenticationError, ForbiddenError, MrisegError
from serve.s3client import parse_s3_uri

log = logging.getLogger(__name__)

TENANTS_FILE_ENV = "MRISEG_TENANTS_FILE"
TENANTS_JSON_ENV = "MRISEG_TENANTS_JSON"


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
        if any(part in ("..", ".") for part in key.split("/")):
            return False
        for prefix in self.prefixes:
            pbucket, pkey = parse_s3_uri(prefix)
            if bucket != pbucket:
                continue
            if not pkey or key.startswith(pkey if pkey.endswith("/") else pkey + "/"):
                return True
        return False


def hash_key(key: str) -> bytes:
    """SHA-256 digest of an API key, the only form kept in memory."""
    return hashlib.sha256(key.encode("utf-8")).digest()


class Tenancy:
    """Authenticates API keys to sites and checks S3 access."""

    def __init__(self, sites: Iterable[Site], key_digests: Mapping[bytes, str]):
        self.sites = {s.name: s for s in sites}
        unknown = {v for v in key_digests.values() if v not in self.sites}
        if unknown:
            raise MrisegError(f"tenants: keys refer to undefined site(s) {sorted(unknown)}")
        # A list, so authentication can compare against every digest without early exit.
        self._digests = list(key_digests.items())

    # -- loading ------------------------------------------------------------
    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "Tenancy":
        if not isinstance(raw, Mapping) or not isinstance(raw.get("sites"), Mapping):
            raise MrisegError("tenants: expected a mapping with a 'sites' mapping of site name -> settings")
        sites, digests = [], {}
        for name, cfg in raw["sites"].items():
            cfg = cfg or {}
            prefixes = tuple(cfg.get("prefixes", ()))
            for p in prefixes:
                parse_s3_uri(p)  # raises a clear error for a non-s3 prefix
            sites.append(Site(str(name), prefixes, int(cfg.get("max_concurrent_jobs", 4)),
                              float(cfg.get("requests_per_second", Site.requests_per_second)),
                              int(cfg.get("burst", Site.burst))))
            for k in cfg.get("keys", ()):
                if len(str(k)) < 16:
                    raise MrisegError(f"tenants: site {name}: API keys must be at least 16 characters")
                digests[hash_key(str(k))] = str(name)
            for h in cfg.get("key_sha256", ()):
                try:
                    d = bytes.fromhex(str(h))
                except ValueError:
                    d = b""
                if len(d) != 32:
                    raise MrisegError(f"tenants: site {name}: key_sha256 entries must be 64 hex characters")
                digests[d] = str(name)
        return cls(sites, digests)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tenancy":
        import yaml

        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise MrisegError(f"tenants file {p} cannot be read ({e.strerror}); set tenants_file or "
                              f"{TENANTS_FILE_ENV} to an existing YAML/JSON file") from e
        return cls.from_mapping(yaml.safe_load(text))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Tenancy":
        """From ``path``, else ``$MRISEG_TENANTS_FILE``, else ``$MRISEG_TENANTS_JSON``."""
        path = path or os.environ.get(TENANTS_FILE_ENV)
        if path:
            return cls.from_file(path)
        if os.environ.get(TENANTS_JSON_ENV):
            return cls.from_mapping(json.loads(os.environ[TENANTS_JSON_ENV]))
        raise MrisegError(f"no tenants configured: pass tenants_file in the app args or set "
                          f"{TENANTS_FILE_ENV} / {TENANTS_JSON_ENV}")

    # -- checks -------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> Site:
        """The site owning ``api_key``; 401 otherwise. Compares every digest in constant time."""
        if not api_key:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        presented = hash_key(api_key)
        found = None
        for digest, site in self._digests:
            if hmac.compare_digest(digest, presented):
                found = site
        if found is None:
            raise AuthenticationError("API key not recognised; ask the consortium operator for your site's key")
        return self.sites[found]

    def check_access(self, site: Site, uri: str, action: str) -> None:
        """403 unless ``uri`` lies under one of ``site``'s prefixes. Logs the refusal without the key."""
        if site.owns(uri):
            return
        bucket, _ = parse_s3_uri(uri)
        # Object keys can carry patient identifiers: log the bucket only.
        log.warning("refused %s by site %s outside its prefixes (bucket %s)", action, site.name, bucket)
        raise ForbiddenError(f"site {site.name} may not {action} this object: it is outside the site's "
                             f"configured prefixes")
