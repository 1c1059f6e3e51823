"""`ntm pki`: create the lab CA, issue identities, run a batch spec, show a certificate.

The role of an identity is the subject OU of its certificate; see :mod:`ntm_pki.ca`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryptography import x509

from ntm_io.config import ConfigError
from ntm_pki import ca


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    p = sub.add_parser("init", help="create a lab CA (ECDSA P-256, 10 years)")
    p.add_argument("--dir", required=True, type=Path, help="PKI directory")
    p.add_argument("--name", default=ca.DEFAULT_CA_NAME, help="CA common name")
    p.add_argument("--force", action="store_true", help="replace an existing CA")

    p = sub.add_parser("issue", help="issue <dir>/<name>.pem and <dir>/<name>.key")
    p.add_argument("--dir", required=True, type=Path, help="PKI directory holding the CA")
    p.add_argument("--name", required=True, help="identity name (subject CN, file stem)")
    p.add_argument("--role", required=True, help=f"one of {', '.join(ca.ROLES)}")
    p.add_argument("--dns", action="append", default=[], metavar="FQDN", help="DNS SAN")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR", help="IP SAN")
    p.add_argument("--days", type=int, default=ca.DEFAULT_DAYS, help="validity in days")

    p = sub.add_parser("batch", help="create/refresh a CA and identities from a TOML spec")
    p.add_argument("--dir", required=True, type=Path, help="PKI directory")
    p.add_argument("--spec", required=True, type=Path, help="spec file ([ca], [[identity]])")

    p = sub.add_parser("show", help="print a certificate's subject, role, SANs and validity")
    p.add_argument("file", type=Path, help="PEM certificate")


def run(args: argparse.Namespace) -> int:
    command: str = args.pki_command
    if command == "init":
        paths = ca.init_ca(args.dir, args.name, force=args.force)
        print(f"CA {args.name!r}: {paths.cert} (key {paths.key})")
    elif command == "issue":
        cert, key = ca.issue(args.dir, args.name, args.role, args.dns, args.ip, args.days)
        print(f"issued {args.name} ({args.role}): {cert} (key {key})")
    elif command == "batch":
        result = ca.batch(args.dir, args.spec)
        print(_batch_summary(args.dir, result))
    elif command == "show":
        print(show(args.file))
    return 0


def _batch_summary(directory: Path, result: ca.BatchResult) -> str:
    ca_line = "created" if result.ca_created else "kept"
    return (
        f"{directory}: CA {ca_line}; issued {len(result.issued)} "
        f"({', '.join(result.issued) or '-'}); kept {len(result.kept)} "
        f"({', '.join(result.kept) or '-'})"
    )


def show(path: Path) -> str:
    """Human-readable summary of one certificate file (the CA or an identity)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:
        raise ConfigError(f"{path}: not a PEM certificate") from None
    role = ca.role_of(cert)
    if role is None:
        role = "(certificate authority)" if _is_ca(cert) else "(none: not an NTM identity)"
    dns, ips = ca.sans_of(cert)
    lines = [
        f"subject:   {cert.subject.rfc4514_string()}",
        f"issuer:    {cert.issuer.rfc4514_string()}",
        f"role:      {role}",
        f"dns:       {', '.join(dns) or '-'}",
        f"ip:        {', '.join(ips) or '-'}",
        f"valid:     {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ} .. "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
        f"serial:    {cert.serial_number:x}",
    ]
    return "\n".join(lines)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
