"""TLS for the API: check a certificate and key pair, or make a self-signed one for the head's addresses."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import ssl
import stat
from pathlib import Path

from cluster.errors import ConfigError
from cluster.files import atomic_write

SELF_SIGNED_DAYS = 825
"""Validity of a self-signed certificate (the longest many TLS clients accept)."""

RENEW_BEFORE_DAYS = 30
"""A self-signed certificate this close to its end is replaced by a fresh one."""


def check_key_file(path: Path) -> Path:
    """Refuse a TLS key that is missing or readable by others (one line: how to fix it)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"TLS key {path}: {exc.strerror}", hint="pass an existing file") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"TLS key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o})",
            hint=f"chmod 600 {path}",
        )
    return path


def check_tls_pair(cert: Path, key: Path) -> None:
    """The certificate and the key load together (PEM, the key matches the certificate)."""
    check_key_file(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TLS certificate {cert} and key {key} do not load together: "
            f"{getattr(exc, 'reason', None) or exc}",
            hint="pass a PEM certificate and its own unencrypted PEM key, or --tls self-signed",
        ) from None


def fingerprint_sha256(cert: Path) -> str:
    """The certificate's SHA-256 fingerprint, colon-separated hex (as `openssl x509
    -fingerprint -sha256` prints it): what a client compares before trusting it."""
    der = ssl.PEM_cert_to_DER_cert(cert.read_text(encoding="ascii"))
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _names_of(cert_pem: bytes) -> set[str] | None:
    """Subject alternative names of a PEM certificate still valid for a while, else None."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc - now < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return None
    names = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return names | set(sans.get_values_for_type(x509.DNSName))


def self_signed(names: list[str], *, cert_path: Path, key_path: Path) -> bool:
    """A self-signed certificate (ECDSA P-256) for ``names`` (IP addresses and host names) at
    ``cert_path``, its key at ``key_path`` (0600), both written whole (temp + rename). One that
    already covers the names and is not about to expire is kept, so that a rerun changes
    nothing; returns True when a new one was written."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise ConfigError(
            "--tls self-signed needs the `cryptography` package on this machine",
            hint="pip install cryptography, or pass --tls-cert and --tls-key",
        ) from None
    wanted = list(dict.fromkeys(n for n in names if n))
    if cert_path.exists() and key_path.exists():
        have = _names_of(cert_path.read_bytes())
        if have is not None and set(wanted) <= have:
            return False
    sans: list[x509.GeneralName] = []
    for name in wanted:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"llamacluster {wanted[0]}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # A CA of its own: clients may trust the file directly (--ca-cert, SSL_CERT_FILE).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(key_path, key_pem.decode("ascii"), mode=0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    return True
