"""The lab CA: create it, issue identities, read them back.

Every control-plane certificate in NTMobile comes from one lab CA (ECDSA P-256).

How an identity is encoded in its certificate (verifiers rely on this):

* subject ``CN`` = the identity name (``dc1``, ``mn1``, ...), also the file stem;
* subject ``OU`` = the role, exactly one of :data:`ROLES` and exactly one OU attribute;
  a certificate with no OU, several OUs or an unknown one has no role and must be refused;
* ``subjectAltName`` dNSName entries = the FQDNs the holder may register (lower case,
  no trailing dot); iPAddress entries = its addresses (for peers that dial an IP);
* basicConstraints CA:FALSE, keyUsage digitalSignature, extendedKeyUsage serverAuth +
  clientAuth (every role is a QUIC client or server of the control plane, or both).

Files in a PKI directory: ``ca.pem`` / ``ca.key`` (the CA) and ``<name>.pem`` /
``<name>.key`` per identity. Keys are PKCS#8 PEM, unencrypted, mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ntm_io.config import ConfigError, load_toml, section

ROLES: tuple[str, ...] = ("dc", "node", "relay", "adaptor", "lb")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_CA_NAME = "NTM Lab CA"
CA_DAYS = 3650
DEFAULT_DAYS = 365
# Reissue a batch identity this close to expiry, so a lab never starts on a dying cert.
RENEW_BEFORE = dt.timedelta(days=30)
# Backdate validity a little: namespaces and VMs of a lab may disagree on the clock.
CLOCK_SKEW = dt.timedelta(minutes=5)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class CaPaths:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Identity:
    """What a certificate says about its holder (parsed, not verified)."""

    name: str
    role: str
    dns_names: frozenset[str]
    ip_addresses: frozenset[str] = frozenset()
    not_before: dt.datetime = field(default=dt.datetime.min.replace(tzinfo=dt.UTC))
    not_after: dt.datetime = field(default=dt.datetime.max.replace(tzinfo=dt.UTC))
    serial: int = 0
    issuer: str = ""
    fingerprint_sha256: str = ""


@dataclass(frozen=True, slots=True)
class IdentitySpec:
    name: str
    role: str
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    days: int = DEFAULT_DAYS


@dataclass(frozen=True, slots=True)
class BatchResult:
    ca_created: bool
    issued: tuple[str, ...]
    kept: tuple[str, ...]


# ---------------------------------------------------------------- validation


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return role


def check_name(name: str) -> str:
    """An identity name is also a file name in the PKI directory, so keep it tame."""
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(
            f"identity name {name!r} is not usable; use letters, digits, '.', '_' or '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )
    if name == Path(CA_CERT).stem:
        raise ConfigError("identity name 'ca' is reserved for the CA files; pick another name")
    return name


def check_fqdn(value: str) -> str:
    """Return the FQDN normalised (lower case, no trailing dot) or raise ConfigError."""
    fqdn = value.strip().lower().removesuffix(".")
    why = _fqdn_problem(fqdn)
    if why:
        raise ConfigError(f"{value!r} is not a valid FQDN: {why}")
    return fqdn


def _fqdn_problem(fqdn: str) -> str | None:
    if not fqdn:
        return "it is empty"
    try:
        ipaddress.ip_address(fqdn)
        return "it is an IP address; pass it with --ip (or ip = [...]) instead"
    except ValueError:
        pass
    if len(fqdn) > 253:
        return "longer than 253 characters"
    labels = fqdn.split(".")
    for label in labels:
        if not _LABEL_RE.match(label):
            return (
                f"label {label!r} must be 1-63 letters, digits or '-', not starting or "
                "ending with '-' (no wildcards, no underscores)"
            )
    if labels[-1].isdigit():
        return "the last label is all digits"
    return None


def check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ConfigError(f"{value!r} is not an IP address (write e.g. 198.51.100.20)") from None


def _check_days(days: int) -> int:
    if days < 1 or days > 36500:
        raise ConfigError(f"days = {days} is out of range; use 1..36500")
    return days


# ---------------------------------------------------------------- files


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with the final mode from the start (a key is never world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # O_CREAT honours umask; chmod does not
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ca_paths(directory: str | os.PathLike[str]) -> CaPaths:
    d = Path(directory)
    return CaPaths(cert=d / CA_CERT, key=d / CA_KEY)


def identity_paths(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{name}.pem", d / f"{name}.key"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ---------------------------------------------------------------- the CA


def init_ca(
    directory: str | os.PathLike[str],
    name: str = DEFAULT_CA_NAME,
    *,
    force: bool = False,
    days: int = CA_DAYS,
) -> CaPaths:
    """Create ``ca.pem``/``ca.key`` in ``directory``; refuse to overwrite unless ``force``."""
    paths = ca_paths(directory)
    if not name.strip():
        raise ConfigError("the CA name is empty; pass --name 'NTM Lab CA' or similar")
    if not force and (paths.cert.exists() or paths.key.exists()):
        raise ConfigError(
            f"{paths.cert.parent} already holds a CA; pass --force to replace it "
            "(every certificate it issued stops being trusted)"
        )
    paths.cert.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_ca_cert(key, name, _check_days(days))
    _write_file(paths.key, _key_pem(key), 0o600)
    _write_file(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def _build_ca_cert(key: ec.EllipticCurvePrivateKey, name: str, days: int) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def load_ca(
    directory: str | os.PathLike[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(directory)
    if not paths.cert.exists() or not paths.key.exists():
        raise ConfigError(
            f"no CA in {paths.cert.parent} (need {CA_CERT} and {CA_KEY}); "
            f"run `ntm pki init --dir {paths.cert.parent}` first"
        )
    try:
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the CA in {paths.cert.parent} is unreadable ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{paths.key} is not an EC key; recreate the CA with `ntm pki init`")
    if key.public_key().public_numbers() != _ec_public(cert).public_numbers():
        raise ConfigError(f"{paths.key} does not belong to {paths.cert}; recreate the CA")
    return cert, key


def _ec_public(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise ConfigError("certificate key is not an EC key; this PKI only issues ECDSA P-256")
    return pub


# ---------------------------------------------------------------- identities


def issue(
    directory: str | os.PathLike[str],
    name: str,
    role: str,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
) -> tuple[Path, Path]:
    """Issue ``<dir>/<name>.pem`` and ``<dir>/<name>.key`` (a fresh key each time)."""
    spec = make_spec(name, role, dns, ips, days)
    ca_cert, ca_key = load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_leaf(spec, key.public_key(), ca_cert, ca_key)
    cert_path, key_path = identity_paths(directory, spec.name)
    # Key first: a cert next to a stale key is worse than a missing cert.
    _write_file(key_path, _key_pem(key), 0o600)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def make_spec(
    name: str, role: str, dns: Iterable[str], ips: Iterable[str], days: int = DEFAULT_DAYS
) -> IdentitySpec:
    """Validate and normalise one identity (dedup, sorted SANs)."""
    dns_t = tuple(sorted({check_fqdn(d) for d in dns}))
    ips_t = tuple(sorted({check_ip(i) for i in ips}, key=_ip_sort_key))
    if not dns_t and not ips_t:
        raise ConfigError(
            f"identity {name!r} has no names; give at least one --dns FQDN or --ip ADDR"
        )
    return IdentitySpec(check_name(name), check_role(role), dns_t, ips_t, _check_days(days))


def _ip_sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


def _build_leaf(
    spec: IdentitySpec,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = _now()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, spec.name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, spec.role),
        ]
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in spec.dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in spec.ips]
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(_ec_public(ca_cert))
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=spec.days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def role_of(cert: x509.Certificate) -> str | None:
    """The role in the subject OU, or None when absent, repeated or unknown."""
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(ous) != 1:
        return None
    value = ous[0].value
    role = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return role if role in ROLES else None


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Read the identity out of a parsed certificate; ConfigError if it has no role."""
    role = role_of(cert)
    if role is None:
        raise ConfigError(
            f"certificate {cert.subject.rfc4514_string()!r} carries no NTM role "
            f"(subject OU must be one of {', '.join(ROLES)}); issue it with `ntm pki issue`"
        )
    dns, ips = sans_of(cert)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else ""
    return Identity(
        name=cn if isinstance(cn, str) else cn.decode("utf-8", "replace"),
        role=role,
        dns_names=frozenset(dns),
        ip_addresses=frozenset(ips),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
        issuer=cert.issuer.rfc4514_string(),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )


def sans_of(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [d.lower() for d in san.get_values_for_type(x509.DNSName)]
    ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    return dns, ips


def load_identity(cert_pem: bytes) -> Identity:
    """Parse one PEM certificate into an :class:`Identity` (no chain verification)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate ({exc})") from None
    return identity_from_certificate(cert)


# ---------------------------------------------------------------- batch


def load_batch_spec(path: str | os.PathLike[str]) -> tuple[str, list[IdentitySpec]]:
    """Parse a batch spec TOML: ``[ca] name`` and ``[[identity]]`` tables."""
    data = load_toml(path)
    ca = section(data, "ca", required=False)
    ca_name: str = ca.text("name", DEFAULT_CA_NAME)
    ca.check_unknown()
    tables = data.get("identity", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: identities must be [[identity]] tables")
    unknown = sorted(set(data) - {"ca", "identity"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {', '.join(unknown)}; use [ca] and [[identity]]"
        )
    specs = [_identity_from_table(t, i) for i, t in enumerate(tables)]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{path}: identity name(s) {', '.join(dupes)} appear more than once")
    return ca_name, specs


def _identity_from_table(table: dict[str, object], index: int) -> IdentitySpec:
    sec = section({"identity": table}, "identity")
    sec.where = f"identity #{index + 1}"
    spec = make_spec(
        sec.text("name"),
        sec.text("role"),
        expand_ranges(sec.texts("dns", []), sec.where),
        sec.texts("ip", []),
        sec.integer("days", DEFAULT_DAYS, lo=1, hi=36500),
    )
    sec.check_unknown()
    return spec


_RANGE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
MAX_RANGE = 4096  # names one range may produce: a certificate is sent in every handshake


def expand_ranges(names: Iterable[str], where: str) -> list[str]:
    """Expand one ``{A..B}`` per name into B-A+1 names (``s{0..2}.x`` -> s0.x, s1.x, s2.x):
    a swarm identity (``ntm swarm``) may register hundreds of names."""
    out: list[str] = []
    for name in names:
        m = _RANGE_RE.search(name)
        if m is None:
            out.append(name)
            continue
        lo, hi = int(m[1]), int(m[2])
        if _RANGE_RE.search(name, m.end()) or not 0 <= hi - lo < MAX_RANGE:
            raise ConfigError(
                f"[{where}] dns entry {name!r}: write one range {{A..B}} with A <= B and at "
                f"most {MAX_RANGE} names, like s{{0..255}}.swarm.ntm.example.com"
            )
        out.extend(f"{name[: m.start()]}{n}{name[m.end() :]}" for n in range(lo, hi + 1))
    return out


def batch(directory: str | os.PathLike[str], spec_path: str | os.PathLike[str]) -> BatchResult:
    """Make the directory match the spec; touch only what is missing or different."""
    ca_name, specs = load_batch_spec(spec_path)
    created = not ca_paths(directory).cert.exists() and not ca_paths(directory).key.exists()
    if created:
        init_ca(directory, ca_name)
    ca_cert, _ = load_ca(directory)
    issued: list[str] = []
    kept: list[str] = []
    for spec in specs:
        if identity_matches(directory, spec, ca_cert):
            kept.append(spec.name)
        else:
            issue(directory, spec.name, spec.role, spec.dns, spec.ips, spec.days)
            issued.append(spec.name)
    return BatchResult(created, tuple(issued), tuple(kept))


def identity_matches(
    directory: str | os.PathLike[str], spec: IdentitySpec, ca_cert: x509.Certificate
) -> bool:
    """True when cert+key exist, the CA signed the cert, and role/SANs equal the spec."""
    cert_path, key_path = identity_paths(directory, spec.name)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        ident = identity_from_certificate(cert)
        same_key = (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and key.public_key().public_numbers() == _ec_public(cert).public_numbers()
        )
    except (OSError, ValueError, TypeError, InvalidSignature, ConfigError):
        return False
    return (
        same_key
        and ident.name == spec.name
        and ident.role == spec.role
        and ident.dns_names == frozenset(spec.dns)
        and ident.ip_addresses == frozenset(spec.ips)
        and ident.not_after - RENEW_BEFORE > _now()
    )
