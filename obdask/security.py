"""Mutual TLS for obdask clusters: certificate tooling and ``distributed.Security``.

:func:`init_certs` (``obdask certs init DIR``) writes a private certificate
authority and one certificate per Dask role, all signed by it:

============================  ================================================
``ca.pem`` / ``ca-key.pem``   the CA (keep ``ca-key.pem`` off the cluster)
``scheduler.pem`` + key       ``dask scheduler --tls-cert/--tls-key``
``worker.pem`` + key          ``dask worker --tls-cert/--tls-key``
``client.pem`` + key          clients: ``obdask run --tls DIR``
============================  ================================================

Keys are written with mode 0600 whatever the umask.  :func:`load` turns such a
folder into a :class:`distributed.Security` with ``require_encryption=True``:
every connection of that process must then be ``tls://``, and each side
presents its role's certificate (distributed requires and checks the peer's
certificate against ``ca.pem``), so a plaintext client, a client without a
certificate and a client whose certificate another CA signed are refused.
See docs/security.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import dask

from obdask.exceptions import SecurityError

if TYPE_CHECKING:
    from distributed import Security

__all__ = ["ROLES", "default_hosts", "from_config", "init_certs", "load"]

logger = logging.getLogger(__name__)

#: Dask roles that get a certificate, in the order they are written.
ROLES = ("scheduler", "worker", "client")
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"


def default_hosts() -> tuple[list[str], list[str]]:
    """Default subject alternative names: ``localhost``, this host's name, ``127.0.0.1``."""
    names = ["localhost"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names, ["127.0.0.1"]


def _files(role: str) -> tuple[str, str]:
    return f"{role}.pem", f"{role}-key.pem"


def init_certs(directory: str | os.PathLike[str], hosts: Iterable[str] | None = None,
               ips: Iterable[str] | None = None, days: int = 365,
               force: bool = False) -> dict[str, Path]:
    """Create a CA and scheduler, worker and client certificates in ``directory``.

    Parameters
    ----------
    directory : str or path
        Folder to write to; created (mode 0700) when missing.
    hosts : iterable of str, optional
        DNS names put in the scheduler and worker certificates; default
        ``localhost`` and this host's name (with ``ips`` given and ``hosts``
        not, no DNS name is added).
    ips : iterable of str, optional
        IP addresses put in them; default ``127.0.0.1``.
    days : int
        Validity of every certificate, from now.
    force : bool
        Overwrite existing files instead of refusing.

    Returns
    -------
    dict
        ``{file name: path}`` of everything written.

    Raises
    ------
    SecurityError
        An IP address does not parse, ``days`` is not positive, or a file
        exists and ``force`` is false.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise SecurityError(f"making certificates needs the cryptography package ({exc}); "
                            "pip install cryptography") from None

    if int(days) < 1:
        raise SecurityError(f"certificate validity {days!r} days: use a positive number of days")
    if hosts is None and ips is None:
        hosts, ips = default_hosts()
    names = list(dict.fromkeys(hosts or []))
    try:
        addresses = [ipaddress.ip_address(str(ip)) for ip in dict.fromkeys(ips or [])]
    except ValueError as exc:
        raise SecurityError(f"{exc}: give IP addresses with --ip and DNS names with --host"
                            ) from None
    folder = Path(directory)
    planned = [CA_CERT, CA_KEY, *(f for role in ROLES for f in _files(role))]
    existing = [f for f in planned if (folder / f).exists()]
    if existing and not force:
        raise SecurityError(f"{folder}: {', '.join(existing)} already exist; use another "
                            "folder or --force to replace them")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=int(days), minutes=5)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "obdask"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key = new_key()
    ca_name = name("obdask CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    written = {CA_CERT: _write(folder / CA_CERT, _pem_cert(ca_cert), 0o644),
               CA_KEY: _write(folder / CA_KEY, _pem_key(ca_key), 0o600)}
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(a) for a in addresses]
    for role in ROLES:
        key = new_key()
        # scheduler and worker both listen and dial (scheduler -> worker, worker ->
        # worker); a client only dials
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role != "client":
            usage.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder().subject_name(name(f"obdask {role}"))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
        )
        if role != "client" and alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names),
                                            critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_file, key_file = _files(role)
        written[cert_file] = _write(folder / cert_file, _pem_cert(cert), 0o644)
        written[key_file] = _write(folder / key_file, _pem_key(key), 0o600)
    logger.info("wrote a CA and %s certificates to %s", ", ".join(ROLES), folder)
    return written


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to ``path`` created with ``mode`` (never briefly wider: no umask race)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; a key must not be wider
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load(directory: str | os.PathLike[str]) -> Security:
    """A ``distributed.Security`` from a folder written by :func:`init_certs`.

    ``ca.pem`` is required; each role's certificate is used when its
    ``ROLE.pem`` and ``ROLE-key.pem`` are both present (a worker host may hold
    only ``worker.pem``).  ``require_encryption`` is on: this process then
    refuses every ``tcp://`` connection.

    Raises
    ------
    SecurityError
        The folder, ``ca.pem`` or every role certificate is missing.
    """
    from distributed import Security

    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise SecurityError(f"TLS folder {str(folder)!r} does not exist; create it with "
                            f"`obdask certs init {folder}`")
    ca = folder / CA_CERT
    if not ca.is_file():
        raise SecurityError(f"TLS folder {str(folder)!r} has no {CA_CERT}; it is written by "
                            f"`obdask certs init {folder}`")
    kwargs: dict[str, str] = {}
    for role in ROLES:
        cert, key = (folder / f for f in _files(role))
        if cert.is_file() and key.is_file():
            kwargs[f"tls_{role}_cert"] = str(cert)
            kwargs[f"tls_{role}_key"] = str(key)
            if os.stat(key).st_mode & 0o077:
                logger.warning("TLS key %s is readable by group or others; chmod 600 it", key)
    if not kwargs:
        raise SecurityError(f"TLS folder {str(folder)!r} has no scheduler, worker or client "
                            "certificate with its key (ROLE.pem + ROLE-key.pem); run "
                            f"`obdask certs init {folder}`")
    return Security(tls_ca_file=str(ca), require_encryption=True, **kwargs)


def from_config() -> Security | None:
    """:func:`load` of ``obdask.security.tls`` (set by ``--tls DIR``); None when unset."""
    folder = dask.config.get("obdask.security.tls", default=None)
    return load(folder) if folder else None
