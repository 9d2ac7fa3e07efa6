"""Real S3 servers on loopback: SeaweedFS (``weed mini``) and moto_server.

Used by ``mriseg up`` (the embedded default object store) and by the tests,
so this is product code. Both servers listen on 127.0.0.1 only, on ports
chosen here (every port SeaweedFS opens is set explicitly, so nothing falls
back to a default port or to 0.0.0.0), and hand out an
:class:`serve.storage.s3client.S3Settings` for clients.

- :class:`SeaweedServer` does real SigV4 auth with static keys (``-s3.config``):
  a server identity and, per site, an identity limited to the site's prefixes.
  Its other ports are locked (JWTs on volume and filer reads and writes,
  mutual TLS on gRPC, HTTP APIs off); :data:`SEAWEED_OPEN_PORTS` is what
  still answers without credentials. It refuses unknown buckets
  (``-s3.autoCreateBucket=false``) and keeps its data in a directory, so it
  can be stopped and restarted on the same ports and data (the
  transient-outage test does exactly that).
- :class:`MotoServer` is the one with S3 bucket notifications into SQS
  (SeaweedFS has no notification API): the event path is tested against it.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import boto3
from botocore.config import Config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from serve.errors import MrisegError
from serve.storage.s3client import S3Settings, has_dot_segments, parse_s3_uri
from serve.storage.servers import HOST, LocalServer, death_signal, free_ports, kill_group, which_tool

log = logging.getLogger(__name__)

# weed mini's port flags. gRPC ports default to HTTP port + 10000 and the
# Iceberg/Lance/WebDAV/admin servers have fixed defaults, so all are set.
SEAWEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)


#: The S3 actions a site identity gets, each scoped to the site's own prefixes. ``Write`` covers
#: PutObject, DeleteObject and multipart uploads; ``List`` is checked against the listing's prefix.
IDENTITY_ACTIONS = ("Read", "Write", "List", "Tagging")

#: SeaweedFS identity names of the server identity and of the scoped ones (``id-<name>``), so that no
#: name given to :class:`SeaweedServer` can become the server's or SeaweedFS's "anonymous" identity.
_SERVER_IDENTITY = "server"

#: The weed mini components that serve gRPC (all behind mutual TLS) and the gRPC client role.
_GRPC_ROLES = ("master", "volume", "filer", "s3", "admin", "worker", "client")


@dataclass(frozen=True)
class OpenPort:
    """A port of ``weed mini`` that still answers without credentials (on 127.0.0.1 only)."""

    flag: str      # the weed mini port flag, a key of SeaweedServer.ports
    serves: str    # what it answers to anyone who can connect
    why: str       # why it stays open


#: What ``weed mini`` 4.48 still answers without credentials once :class:`SeaweedServer` has locked it
#: down (checked by ``tests/storage/test_embedded_s3_security.py``); none of it is object data, object names or
#: keys. ``mriseg up`` prints these and docs/serving.md lists them.
SEAWEED_OPEN_PORTS = (
    OpenPort("master.port", "its status page, /cluster/status and /cluster/healthz: the volume topology "
             "and counts", "-disableHttp turns off the master's HTTP API but not its status page"),
    OpenPort("volume.port", "/status and /healthz: disk usage and the volume list (bucket names, file "
             "counts, sizes)", "the volume server has no switch for them; every object read and write "
             "needs a JWT"),
    OpenPort("admin.port", "/health and /metrics: request and maintenance counters",
             "weed mini always starts its admin server (-admin.port=0 stops it creating buckets); "
             "its UI and API are off"),
)


def _scoped_actions(prefixes: Sequence[str]) -> list[str]:
    """SeaweedFS actions granting :data:`IDENTITY_ACTIONS` under ``prefixes`` only.

    ``Action:bucket`` grants the whole bucket; ``Action:bucket/key-prefix/*`` grants keys (and listings)
    starting with the key prefix, which is always whole path segments (it ends in ``/``), so
    ``s3://b/site-a/`` does not reach ``s3://b/site-ab/``.
    """
    actions: list[str] = []
    for uri in prefixes:
        bucket, key = parse_s3_uri(uri)
        if has_dot_segments(key) or "*" in key:
            raise MrisegError(f"embedded S3: prefix {uri!r} has a '.'/'..' segment or a '*'; "
                              f"give the prefix as objects are stored under it")
        if key and not key.endswith("/"):
            key += "/"
        actions += [f"{a}:{bucket}/{key}*" if key else f"{a}:{bucket}" for a in IDENTITY_ACTIONS]
    return actions


def _private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (created 0600, never widened on the way)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)  # a file that existed keeps its old mode through O_CREAT


def _issue_grpc_certs(tls_dir: Path, roles: Sequence[str]) -> None:
    """A fresh CA and one certificate per gRPC role in ``tls_dir`` (keys 0600); the CA's key is not kept.

    SeaweedFS's gRPC is mutual TLS with every certificate the CA signed (host names are not checked),
    so nothing can join or call the cluster without one of these; a new start issues new ones.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mriseg embedded S3 CA {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _private_file(tls_dir / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))])
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(san, critical=False).add_extension(usage, critical=False)
                .sign(ca_key, hashes.SHA256()))
        _private_file(tls_dir / f"{role}.crt", cert.public_bytes(serialization.Encoding.PEM))
        _private_file(tls_dir / f"{role}.key", key.private_bytes(serialization.Encoding.PEM,
                                                                 serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class SeaweedServer(LocalServer):
    """``weed mini`` on 127.0.0.1, locked down; restartable on the same ports and data dir.

    - S3 needs SigV4 with a configured identity: the server identity (:attr:`settings`, every bucket,
      bucket admin) and one per entry of ``identities``, limited to its prefixes for read, write, list
      and tagging (:meth:`identity_settings`).
    - ``security.toml`` in the data dir: JWTs signed with fresh keys for every volume and filer read
      and write, mutual TLS on every gRPC port with certificates issued at each start, the volume and
      filer UIs off; with ``-disableHttp`` the master's and filer's HTTP APIs are off. What still
      answers without credentials is :data:`SEAWEED_OPEN_PORTS`.
    - Keys, certificates and configs are 0600 in a 0700 data dir.
    """

    READY_BUCKET = "mriseg-ready"

    def __init__(self, data_dir: str | os.PathLike | None = None, buckets: Sequence[str] = (),
                 access_key: str | None = None, secret_key: str | None = None, ready_timeout_s: float = 90.0,
                 identities: Mapping[str, Sequence[str]] | None = None):
        """
        Args:
            data_dir: where weed keeps its data, configs and keys (default: a new temporary dir,
                removed by :meth:`cleanup`).
            buckets: buckets created at start.
            access_key: the server identity's access key (default: a random one).
            secret_key: its secret key (default: a random one).
            ready_timeout_s: how long :meth:`start` waits for a PUT to succeed.
            identities: name -> ``s3://bucket/prefix/`` URIs: one S3 identity each, with keys of its own,
                that may read, write, list and tag objects under those prefixes only.
        """
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="mriseg-weed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tls_dir = self.data_dir / "tls"
        self.buckets = list(buckets)
        self.access_key = access_key or "mriseg" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.ready_timeout_s = ready_timeout_s
        self.ports = dict(zip(SEAWEED_PORT_FLAGS, free_ports(len(SEAWEED_PORT_FLAGS))))
        self.log_path = self.data_dir / "weed.log"
        self.settings = self._settings_for(self.access_key, self.secret_key)
        self._identities: dict[str, tuple[list[str], S3Settings]] = {}
        for name, prefixes in (identities or {}).items():
            if isinstance(prefixes, str):
                raise MrisegError(f"embedded S3: identity {name!r}: give a list of prefixes, not one string")
            keys = ("mriseg" + secrets.token_hex(6), secrets.token_urlsafe(24))
            self._identities[str(name)] = (_scoped_actions(list(prefixes)), self._settings_for(*keys))

    def _settings_for(self, access_key: str, secret_key: str) -> S3Settings:
        return S3Settings(endpoint_url=f"http://{HOST}:{self.ports['s3.port']}", region="us-east-1",
                          path_style=True, access_key_id=access_key, secret_access_key=secret_key, max_attempts=3)

    @property
    def identities(self) -> list[str]:
        """The names of the scoped identities."""
        return list(self._identities)

    def identity_settings(self, name: str) -> S3Settings:
        """S3 settings with the keys of identity ``name`` (limited to its prefixes).

        Args:
            name: a key of the ``identities`` the server was made with.

        Returns:
            The settings; a :class:`MrisegError` naming the known identities for an unknown name.
        """
        try:
            return self._identities[name][1]
        except KeyError:
            raise MrisegError(f"embedded S3: no identity {name!r}; known: {sorted(self._identities)}") from None

    def open_ports(self) -> list[tuple[int, OpenPort]]:
        """The ports of this server that answer without credentials, with what they serve."""
        return [(self.ports[p.flag], p) for p in SEAWEED_OPEN_PORTS]

    def _write_config(self) -> Path:
        """``s3.json``: the server identity (bucket admin) and the scoped ones."""
        ids = [{"name": _SERVER_IDENTITY,
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
        for name, (actions, s) in self._identities.items():
            ids.append({"name": f"id-{name}",
                        "credentials": [{"accessKey": s.access_key_id, "secretKey": s.secret_access_key}],
                        "actions": actions})
        path = self.data_dir / "s3.json"
        _private_file(path, json.dumps({"identities": ids}).encode())
        return path

    def _write_security(self) -> Path:
        """``security.toml`` with fresh JWT keys and gRPC certificates (see the class docstring)."""
        self.tls_dir.mkdir(mode=0o700, exist_ok=True)
        self.tls_dir.chmod(0o700)
        _issue_grpc_certs(self.tls_dir, _GRPC_ROLES)
        lines = []
        # Reads too: without [jwt.signing.read] a volume serves any object to whoever knows its file id.
        for section in ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read"):
            lines += [f"[{section}]", f"key = {_toml_str(secrets.token_hex(32))}", "expires_after_seconds = 10"]
        lines += ["[access]", "ui = false", "[filer.expose_directory_metadata]", "enabled = false",
                  "[grpc]", f"ca = {_toml_str(str(self.tls_dir / 'ca.crt'))}"]
        for role in _GRPC_ROLES:
            lines += [f"[grpc.{role}]", f"cert = {_toml_str(str(self.tls_dir / f'{role}.crt'))}",
                      f"key = {_toml_str(str(self.tls_dir / f'{role}.key'))}"]
        path = self.data_dir / "security.toml"
        _private_file(path, ("\n".join(lines) + "\n").encode())
        return path

    def command(self) -> list[str]:
        """The ``weed`` command line; writes the configs, keys and certificates it names first."""
        self.data_dir.chmod(0o700)  # the sockets, the stored objects and the configs are the owner's
        cfg = self._write_config()
        self._write_security()
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "admin").mkdir(parents=True, exist_ok=True)
        # -config_dir: security.toml from the data dir, never a $HOME/.seaweedfs or /etc one.
        cmd = [which_tool("weed"), f"-config_dir={self.data_dir}", "mini", f"-dir={self.data_dir / 'data'}",
               f"-ip={HOST}", f"-ip.bind={HOST}", "-disableHttp",
               "-master.telemetry=false", f"-s3.config={cfg}", "-s3.autoCreateBucket=false",
               "-webdav=false", "-admin.ui=false", f"-admin.dataDir={self.data_dir / 'admin'}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
               f"-filer.localSocket={self.data_dir / 'filer.sock'}",
               f"-s3.localSocket={self.data_dir / 's3.sock'}",
               f"-bucket={','.join([self.READY_BUCKET, *self.buckets])}"]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return cmd

    def start(self) -> "SeaweedServer":
        """Start (or restart, same ports and data) and wait until a put succeeds."""
        if self.running:
            return self
        # AWS_* would add an admin identity; WEED_* would override security.toml (weed prefers the environment).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        cmd = self.command()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.data_dir, env=env,
                                         start_new_session=True, preexec_fn=death_signal())
        self._client = None
        self._wait_ready(self.ready_timeout_s)
        log.info("SeaweedFS S3 ready on %s", self.settings.endpoint_url)
        return self

    def _probe(self) -> None:
        c = boto3.session.Session().client(
            "s3", endpoint_url=self.settings.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5,
                          s3={"addressing_style": "path"}))
        c.put_object(Bucket=self.READY_BUCKET, Key="probe", Body=b"ok")

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass

    def stop(self) -> None:
        """Stop the whole process group; the data dir stays for a restart."""
        if self.proc is not None:
            kill_group(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        """Stop and remove the data dir if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.cleanup()


class MotoServer(LocalServer):
    """``moto_server`` (S3 + SQS with notifications, visibility timeouts and redrive) on 127.0.0.1."""

    def __init__(self, port: int | None = None, ready_timeout_s: float = 60.0,
                 log_dir: str | os.PathLike | None = None):
        self.port = port or free_ports(1)[0]
        self.ready_timeout_s = ready_timeout_s
        self._owns_log_dir = log_dir is None  # a folder it made for itself goes with stop()
        self._log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mriseg-moto-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_dir / "moto.log"
        # moto accepts any keys; these only keep boto3 from searching the environment.
        self.settings = S3Settings(endpoint_url=f"http://{HOST}:{self.port}", region="us-east-1", path_style=True,
                                   access_key_id="testing", secret_access_key="testing", max_attempts=3)

    def start(self) -> "MotoServer":
        if self.running:
            return self
        self._log_dir.mkdir(parents=True, exist_ok=True)  # again after a stop() that removed it
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([which_tool("moto_server"), "-H", HOST, "-p", str(self.port)],
                                         stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=death_signal())
        self._wait_ready(self.ready_timeout_s)
        return self

    def _probe(self) -> None:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/moto-api/", timeout=2) as r:
            r.read()

    def sqs(self):
        """A boto3 SQS client for this server."""
        return boto3.session.Session().client(
            "sqs", endpoint_url=self.settings.endpoint_url, region_name=self.settings.region,
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
        self.proc = None
        if self._owns_log_dir:
            shutil.rmtree(self._log_dir, ignore_errors=True)
