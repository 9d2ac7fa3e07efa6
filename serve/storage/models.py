"""S3 model sources: ``s3://bucket/prefix/DatasetNNN_*`` copied once into a local cache, verified.

:class:`serve.inference.modelstore.ModelStore` resolves sub-models without an S3 client; the
callers that accept ``s3://`` model sources build their store with :func:`open_model_store`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Sequence

from botocore.exceptions import BotoCoreError, ClientError

from serve.cachedir import cache_root
from serve.catalogue import Catalogue, SubModel
from serve.errors import ModelFolderError, ModelSourceUnreachableError
from serve.inference.modelstore import MANIFEST, ModelStore
from serve.inference.pins import PinnedManifest, sha256_file
from serve.storage.s3client import S3Settings, make_client, parse_s3_uri
from serve.storage.staging import IntegrityError, verify_download

log = logging.getLogger(__name__)


def open_model_store(sources: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None,
                     s3: S3Settings | None = None, catalogue: Catalogue | None = None,
                     pins: str | os.PathLike | None = None) -> ModelStore:
    """A model store whose ``s3://`` sources are read through an :class:`S3ModelCache` each.

    Args:
        sources: Local folders and ``s3://bucket/prefix`` URIs, searched in order.
        cache_dir: Where S3 sources are copied (default ``$MRISEG_CACHE/models``).
        s3: S3 client settings for S3 sources.
        catalogue: The sub-model catalogue (default the packaged one).
        pins: The operator's pinned manifest (see :class:`ModelStore`); an S3 source needs one.

    Returns:
        The model store.
    """
    cache = Path(cache_dir or cache_root() / "models")
    remote = {str(s): S3ModelCache(str(s), cache, s3) for s in sources if str(s).startswith("s3://")}
    return ModelStore(sources, cache_dir=cache, catalogue=catalogue, pins=pins, remote=remote)


class S3ModelCache:
    """Mirror ``s3://bucket/prefix/DatasetNNN_*`` into a local cache, once, verified."""

    def __init__(self, uri: str, cache_dir: Path, s3: S3Settings | None = None):
        self.uri = uri
        self.bucket, prefix = parse_s3_uri(uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self.root = Path(cache_dir) / "s3" / self.bucket / self.prefix.rstrip("/")
        self._settings = s3
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self._settings)
        return self._client

    def _listing(self, dataset_prefix: str) -> list[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + dataset_prefix)
        return [o for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]

    def _local(self, key: str, root: Path | None = None) -> Path:
        """Where ``key`` goes under ``root`` (the cache); a key that would leave it is refused."""
        rel = key[len(self.prefix):]
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ModelFolderError(f"model source s3://{self.bucket}/{self.prefix} holds an object whose key has "
                                   f"an empty, '.' or '..' segment; it would be written outside the model cache. "
                                   f"Remove it from the bucket")
        return (root or self.root).joinpath(*parts)

    def _cache_matches(self, dataset_dir: Path, wanted: dict) -> bool:
        """The cached copy is of the same objects (key, size, ETag) and complete on disk."""
        try:
            manifest = json.loads((dataset_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(manifest, dict) or \
                {k: {"size": v.get("size"), "etag": v.get("etag")} for k, v in manifest.items()} != wanted:
            return False
        return all(self._local(k).is_file() and self._local(k).stat().st_size == v["size"]
                   for k, v in manifest.items())

    def fetch(self, sm: SubModel, pins: PinnedManifest | None = None) -> Path | None:
        try:
            return self._fetch(sm, pins)
        except (BotoCoreError, ClientError) as e:
            code = e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else None
            raise ModelSourceUnreachableError(
                f"model source {self.uri} cannot be read ({code or type(e).__name__}); "
                f"check the bucket, prefix and credentials") from e

    def _fetch(self, sm: SubModel, pins: PinnedManifest | None = None) -> Path | None:
        """Local copy of the sub-model's dataset folder, or None if S3 has none.

        Downloads go to a private folder that is renamed into place once complete and verified, so
        replicas filling one cache at once never see (or delete) each other's half-written files.
        With ``pins``, a dataset folder they do not name is not downloaded, and a download whose
        sha256 differs from its pin is discarded.
        """
        objects = self._listing(sm.folder_prefix)
        if not objects:
            return None
        name = objects[0]["Key"][len(self.prefix):].split("/", 1)[0]
        objects = [o for o in objects if o["Key"][len(self.prefix):].split("/", 1)[0] == name]
        dataset_dir = self.root / name
        wanted = {o["Key"]: {"size": o["Size"], "etag": o["ETag"]} for o in objects}
        for key in wanted:
            self._local(key)  # refuse escaping keys before anything is written
        pinned = pins.dataset(sm, name) if pins is not None else None  # an unpinned dataset: nothing downloaded
        if self._cache_matches(dataset_dir, wanted):
            return dataset_dir
        self.root.mkdir(parents=True, exist_ok=True)
        staging_root = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            manifest = {}
            for key, meta in wanted.items():
                dest = self._local(key, staging_root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
                self.client.download_file(self.bucket, key, str(dest))
                digest = sha256_file(dest)
                try:
                    verify_download({**head, "ContentLength": meta["size"]}, digest, dest.stat().st_size,
                                    self.bucket)
                except IntegrityError as e:
                    raise ModelFolderError(f"s3://{self.bucket}/{key}: {e.message}; the download was "
                                           f"discarded") from e
                want = (pinned or {}).get(key[len(self.prefix) + len(name) + 1:])
                if want is not None and want != digest:
                    raise ModelFolderError(f"{sm.name}: s3://{self.bucket}/{key} does not match the pinned model "
                                           f"manifest {pins.path} (sha256 {digest[:16]}..., pinned {want[:16]}...); "
                                           f"the download was discarded")
                manifest[key] = {**meta, "sha256": digest}
            (staging_root / name / MANIFEST).write_text(json.dumps(manifest, indent=1))
            self._install(staging_root / name, dataset_dir, wanted)
        finally:
            shutil.rmtree(staging_root, ignore_errors=True)
        log.info("cached %s from s3://%s/%s (%d files)", sm.name, self.bucket, self.prefix, len(manifest))
        return dataset_dir

    def _install(self, complete: Path, dataset_dir: Path, wanted: dict) -> None:
        """Move a complete download into place; another replica may have got there first."""
        for _ in range(3):
            try:
                os.rename(complete, dataset_dir)
                return
            except OSError:
                if self._cache_matches(dataset_dir, wanted):
                    return  # an identical copy won the race
                old = dataset_dir.with_name(f".{dataset_dir.name}.old-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(dataset_dir, old)  # a stale copy: set aside, then removed
                except FileNotFoundError:
                    continue
                shutil.rmtree(old, ignore_errors=True)
        raise ModelFolderError(f"could not install the downloaded model into {dataset_dir}")
