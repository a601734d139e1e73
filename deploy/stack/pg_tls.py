"""A throwaway certificate authority and the PostgreSQL server's certificate, made with
`openssl` on first use and kept with the cluster (clients verify against ca.pem).

    <home>/tls/ca.pem, ca.key          the CA (the key stays with root, mode 0600)
    <home>/tls/server.crt, server.key  the server's, SAN IP:127.0.0.1 and DNS:localhost;
                                       the key is owned by the server's user, mode 0600
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

from .output import StackError

CA_DAYS = 3650
SERVER_DAYS = 825
SAN = "IP:127.0.0.1,DNS:localhost"


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    ca: Path
    cert: Path
    key: Path


def _openssl(args: list[str], log: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise StackError("openssl not found (the stack makes its TLS certificates with it)")
    with open(log, "ab") as out:
        rc = subprocess.run([openssl, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise StackError(f"openssl {args[0]} failed (exit code {rc})", log)


def make_ca(folder: Path, name: str, log: Path) -> tuple[Path, Path]:
    """(ca.pem, ca.key) in `folder`, made when missing."""
    ca, key = folder / "ca.pem", folder / "ca.key"
    if ca.exists() and key.exists():
        return ca, key
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", str(key), "-out", str(ca), "-days", str(CA_DAYS), "-subj", f"/CN={name}",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
             log)
    key.chmod(0o600)
    ca.chmod(0o644)
    return ca, key


def server_tls(home: Path, run_as: tuple[int, int] | None) -> ServerTLS:
    """The CA and a server certificate for 127.0.0.1/localhost under home/tls, made when missing;
    the key is given to `run_as` (PostgreSQL refuses a key another user can read)."""
    folder = home / "tls"
    log = home / "tls.log"
    ca, ca_key = make_ca(folder, "runstate local PostgreSQL CA", log)
    cert, key, csr = folder / "server.crt", folder / "server.key", folder / "server.csr"
    if not (cert.exists() and key.exists()):
        _openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"], log)
        ext = folder / "server.ext"
        ext.write_text(f"subjectAltName={SAN}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        _openssl(["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                  "-out", str(cert), "-days", str(SERVER_DAYS), "-extfile", str(ext)], log)
        csr.unlink(missing_ok=True)
        key.chmod(0o600)
        cert.chmod(0o644)
    if run_as is not None:
        os.chown(folder, *run_as)
        os.chown(key, *run_as)
    return ServerTLS(ca=ca, cert=cert, key=key)
