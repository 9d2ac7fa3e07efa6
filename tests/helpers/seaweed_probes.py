"""Probes of the embedded SeaweedFS's own ports: on-disk file ids, and whether a port speaks HTTP/2 (gRPC)."""

from __future__ import annotations

import ssl
from pathlib import Path

GRPC_PORTS = ("master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc")
# the client's connection preface and an empty SETTINGS frame (RFC 9113 3.4); a gRPC server answers SETTINGS
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def file_ids(data_dir: Path, collection: str) -> list[str]:
    """The file id of the first needle of each of a collection's volumes, read from its ``.dat`` file.

    A volume file is an 8-byte superblock (bytes 6-7: the length of an extra block after it), then
    needles aligned to 8 bytes, each starting with its cookie (4 bytes) and id (8 bytes), big-endian;
    a file id is ``<volume>,<id hex><cookie as 8 hex digits>``.
    """
    fids = []
    for dat in sorted(data_dir.glob(f"{collection}_*.dat")):
        raw = dat.read_bytes()
        start = 8 + int.from_bytes(raw[6:8], "big")
        start += -start % 8
        if len(raw) >= start + 12:
            cookie = int.from_bytes(raw[start:start + 4], "big")
            needle = int.from_bytes(raw[start + 4:start + 12], "big")
            fids.append(f"{dat.stem.rsplit('_', 1)[1]},{needle:x}{cookie:08x}")
    return fids


def h2_answer(sock) -> bytes:
    """Send the HTTP/2 preface; the first bytes of the answer (b"" when the server closed or refused)."""
    try:
        sock.sendall(H2_PREFACE)
        return sock.recv(64)
    except (ssl.SSLError, ConnectionError):
        return b""


def is_settings_frame(data: bytes) -> bool:
    return len(data) >= 9 and data[3] == 0x04  # frame type 4: SETTINGS
