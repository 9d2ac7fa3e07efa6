"""Authenticated records: what the server writes to S3 and later acts on carries an HMAC.

The job records (``<jobs>/jobs/<key>.json``), the held pushes
(``<jobs>/pushed/<id>.json``) and the ``job.json`` the job runner publishes in
an output folder all lie where a site with write access to its own S3 prefix
may be able to write too. Each is signed with a key only the server holds, so
a record a site forged (or copied from elsewhere) is never acted on.

**MAC**: HMAC-SHA256 with the record key over the canonical JSON of
``{"v": 1, "bucket": B, "key": K, "site": S, "body": BODY}``, where ``B``/``K``
are the bucket and object key the record is stored at and ``S`` is the site the
record is for. Canonical JSON: keys sorted, no spaces, UTF-8, non-ASCII as is
(``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``).
A valid record copied to another key, bucket or site no longer verifies.

**Layouts** (both carry the same MAC):

- the envelope, for records only the server reads (job records, held pushes)::

      {"v": 1, "site": "<site>", "body": {...}, "mac": "<64 hex digits>"}

- inline, for the published ``job.json`` that sites and tools read as it is:
  the document's own members plus ``"mac": "<64 hex digits>"``; ``BODY`` is
  the document without ``mac`` and ``S`` its ``site`` member.

A record that does not verify raises :class:`ForgedRecord` (its ``reason``
says why: ``unsigned``, ``bad mac``, ``malformed``, ``unknown version``).
Callers ignore such a record, never act on it, and call :func:`rejected`,
which writes a ``record.rejected`` audit line (bucket, a digest of the key,
the reason; never the key itself).

**Key file**: at least 32 random bytes written as hex (64 or more hex
digits; surrounding whitespace ignored), named by ``$MRISEG_RECORD_KEY_FILE``
(or the intake's ``events.record_key_file``). Make one with
``mriseg record-key generate PATH`` or ``python -m serve.jobs.records generate PATH``
(``openssl rand -hex 32 > PATH`` does as well). Every replica that reads or
writes records must hold the same key; a new key makes every earlier record
read as absent (jobs run again, held pushes are set aside).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from serve.audit import audit
from serve.errors import MrisegError

ENV = "MRISEG_RECORD_KEY_FILE"
MIN_KEY_BYTES = 32
#: a stored record larger than this is none this server wrote; readers do not load it
MAX_RECORD_BYTES = 1 << 20
VERSION = 1
_HOW = "make one with `mriseg record-key generate PATH` (or `python -m serve.jobs.records generate PATH`)"


class RecordKeyError(MrisegError):
    """The record key is not configured, cannot be read, or is too short."""

    status = 500
    title = "Record key unusable"


class ForgedRecord(Exception):
    """A record whose MAC does not verify: not written by this server at this place."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def canonical(obj: Any) -> bytes:
    """The bytes the MAC covers: sorted keys, no spaces, UTF-8 (lone surrogates passed through)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def key_digest(key: str) -> str:
    """A short digest of an object key, for logs and audit lines (keys may carry patient data)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def rejected(kind: str, bucket: str, key: str, reason: str) -> None:
    """Audit a record that was ignored because it did not verify.

    Args:
        kind: what the record was (``job``, ``push``, ``job.json``).
        bucket: the bucket it was read from.
        key: its object key (only a digest is logged).
        reason: :attr:`ForgedRecord.reason`.
    """
    audit("record.rejected", kind=kind, bucket=bucket, key=key_digest(key), reason=reason)


class RecordSigner:
    """Signs and verifies records with one HMAC-SHA256 key."""

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise RecordKeyError(f"the record key has {len(key)} bytes; it needs at least {MIN_KEY_BYTES}: {_HOW}")
        self._key = bytes(key)

    def __repr__(self) -> str:  # never the key
        return f"RecordSigner(key id {hashlib.sha256(self._key).hexdigest()[:8]})"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "RecordSigner":
        """The signer of a key file (hex text, at least 64 hex digits).

        Args:
            path: the key file.
        Returns:
            The signer; :class:`RecordKeyError` saying what to do when the file is missing or unusable.
        """
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not hex text"
            raise RecordKeyError(f"cannot read the record key file {path} ({why}); {_HOW}") from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise RecordKeyError(f"the record key file {path} must hold hex digits only (at least "
                                 f"{2 * MIN_KEY_BYTES}); {_HOW}") from None
        if len(key) < MIN_KEY_BYTES:
            raise RecordKeyError(f"the record key in {path} has {len(key)} bytes; it needs at least "
                                 f"{MIN_KEY_BYTES} ({2 * MIN_KEY_BYTES} hex digits): {_HOW}")
        return cls(key)

    @classmethod
    def from_env(cls) -> "RecordSigner":
        """The signer of the key file ``$MRISEG_RECORD_KEY_FILE`` names.

        Returns:
            The signer; :class:`RecordKeyError` saying what to set when the variable is unset.
        """
        path = os.environ.get(ENV, "").strip()
        if not path:
            raise RecordKeyError(f"no record key: set {ENV} to a file holding the key that signs job records "
                                 f"(or the intake's events.record_key_file); {_HOW}")
        return cls.from_file(path)

    @staticmethod
    def generate(path: str | os.PathLike) -> Path:
        """Write a new key file (32 random bytes as hex, mode 0600); an existing file is never replaced.

        Args:
            path: where to write it.
        Returns:
            The path written.
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise RecordKeyError(f"{path} exists; a new key would make every record signed with the old one read "
                                 f"as absent. Remove it first if that is what you want") from None
        except OSError as e:
            raise RecordKeyError(f"cannot write the record key file {path} ({e.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
        return path

    # -- the MAC ---------------------------------------------------------------------
    def mac(self, body: Any, *, bucket: str, key: str, site: str) -> str:
        """The hex MAC of ``body`` stored at ``s3://bucket/key`` for ``site``."""
        msg = canonical({"v": VERSION, "bucket": bucket, "key": key, "site": site, "body": body})
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def _verify(self, body: Any, mac: Any, *, bucket: str, key: str, site: str) -> None:
        expected = self.mac(body, bucket=bucket, key=key, site=site).encode()
        # bytes: compare_digest refuses str with non-ASCII characters, which a forger may send
        if not isinstance(mac, str) or not hmac.compare_digest(expected, mac.encode("utf-8", "surrogatepass")):
            raise ForgedRecord("bad mac")

    # -- envelope: records only the server reads ---------------------------------------
    def seal(self, body: Mapping[str, Any], *, bucket: str, key: str, site: str) -> dict[str, Any]:
        """The envelope of ``body`` to be stored at ``s3://bucket/key``.

        Args:
            body: the record (a JSON object; normalised through JSON, so tuples become lists).
            bucket: the bucket it will be stored in.
            key: its object key.
            site: the site it is for.
        Returns:
            ``{"v": 1, "site": site, "body": body, "mac": hex}``.
        """
        body = json.loads(canonical(dict(body)))
        return {"v": VERSION, "site": site, "body": body, "mac": self.mac(body, bucket=bucket, key=key, site=site)}

    def unseal(self, doc: Any, *, bucket: str, key: str) -> tuple[str, dict[str, Any]]:
        """Verify an envelope read from ``s3://bucket/key``.

        Args:
            doc: the parsed JSON.
            bucket: the bucket it was read from.
            key: its object key.
        Returns:
            ``(site, body)``; :class:`ForgedRecord` when it does not verify.
        """
        if not isinstance(doc, Mapping) or "mac" not in doc:
            raise ForgedRecord("unsigned")
        if doc.get("v") != VERSION:
            raise ForgedRecord("unknown version")
        site, body = doc.get("site"), doc.get("body")
        if not isinstance(site, str) or not isinstance(body, dict):
            raise ForgedRecord("malformed")
        self._verify(body, doc["mac"], bucket=bucket, key=key, site=site)
        return site, body

    # -- inline: documents others read as they are (job.json) ---------------------------
    def stamp(self, doc: Mapping[str, Any], *, bucket: str, key: str) -> dict[str, Any]:
        """``doc`` with a ``mac`` member, to be stored at ``s3://bucket/key``; its ``site`` member is the site.

        Args:
            doc: the document (a JSON object with a string ``site``).
            bucket: the bucket it will be stored in.
            key: its object key.
        Returns:
            The document (normalised through JSON) plus ``mac``.
        """
        body = json.loads(canonical({k: v for k, v in doc.items() if k != "mac"}))
        return {**body, "mac": self.mac(body, bucket=bucket, key=key, site=str(body.get("site")))}

    def check(self, doc: Any, *, bucket: str, key: str) -> dict[str, Any]:
        """Verify a stamped document read from ``s3://bucket/key``.

        Args:
            doc: the parsed JSON.
            bucket: the bucket it was read from.
            key: its object key.
        Returns:
            The document without ``mac``; :class:`ForgedRecord` when it does not verify.
        """
        if not isinstance(doc, Mapping) or "mac" not in doc:
            raise ForgedRecord("unsigned")
        body = {k: v for k, v in doc.items() if k != "mac"}
        if not isinstance(body.get("site"), str):
            raise ForgedRecord("malformed")
        self._verify(body, doc["mac"], bucket=bucket, key=key, site=body["site"])
        return body


# -- CLI ------------------------------------------------------------------------------
def _cmd_generate(args) -> int:
    path = RecordSigner.generate(args.path)
    print(f"wrote a new record key to {path} (mode 0600); point {ENV} at it on every replica")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    g = sub.add_parser("generate", help="write a new record key file (32 random bytes as hex, mode 0600)")
    g.add_argument("path", help="the file to create (never overwritten)")
    g.set_defaults(func=_cmd_generate)


def register(subparsers) -> None:
    """Add ``mriseg record-key`` to serve/cli/main.py's parser."""
    _add_arguments(subparsers.add_parser("record-key", help="make the key that signs job records",
                                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serve.jobs.records generate PATH`` (the same as ``mriseg record-key generate PATH``)."""
    p = argparse.ArgumentParser(prog="python -m serve.jobs.records", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except MrisegError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
