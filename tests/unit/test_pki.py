"""ntm_pki: CA creation, issuing, batch idempotency, identity round-trip, CLI."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from ntm_cli.main import main as ntm_main
from ntm_io.config import ConfigError
from ntm_pki import ca

SPEC = """
[ca]
name = "Test Lab CA"

[[identity]]
name = "dc1"
role = "dc"
dns = ["dc1.ntm.example.com"]
ip = ["198.51.100.20", "2001:db8:100::20"]

[[identity]]
name = "mn1"
role = "node"
dns = ["mn1.ntm.example.com"]
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _fingerprints(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------- init


def test_init_creates_p256_ca_with_private_key_mode(tmp_path: Path) -> None:
    paths = ca.init_ca(tmp_path / "pki", "Unit CA")
    assert _mode(paths.key) == 0o600
    assert _mode(paths.cert) == 0o644
    cert = _cert(paths.cert)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.rfc4514_string() == "CN=Unit CA"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3649 <= lifetime.days <= 3651


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = ca.init_ca(tmp_path).cert.read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        ca.init_ca(tmp_path)
    assert ca.ca_paths(tmp_path).cert.read_bytes() == first
    ca.init_ca(tmp_path, force=True)
    assert ca.ca_paths(tmp_path).cert.read_bytes() != first


def test_key_mode_ignores_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        paths = ca.init_ca(tmp_path)
        _, key = ca.issue(tmp_path, "n1", "node", ["n1.example.com"])
    finally:
        os.umask(old)
    assert _mode(paths.key) == 0o600
    assert _mode(key) == 0o600


# ---------------------------------------------------------------- issue


def test_issue_round_trips_role_and_sans(tmp_path: Path) -> None:
    ca.init_ca(tmp_path)
    cert_path, key_path = ca.issue(
        tmp_path, "dc1", "dc", ["DC1.ntm.example.com.", "dc1.ntm.example.com"], ["::1", "127.0.0.1"]
    )
    assert cert_path == tmp_path / "dc1.pem" and key_path == tmp_path / "dc1.key"
    assert _mode(key_path) == 0o600
    ident = ca.load_identity(cert_path.read_bytes())
    assert ident.name == "dc1"
    assert ident.role == "dc"
    assert ident.dns_names == frozenset({"dc1.ntm.example.com"})
    assert ident.ip_addresses == frozenset({"127.0.0.1", "::1"})
    assert ident.issuer == "CN=NTM Lab CA"
    # Signed by the CA, and the role is the single subject OU.
    cert = _cert(cert_path)
    cert.verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    ous = cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [o.value for o in ous] == ["dc"]


@pytest.mark.parametrize("role", ca.ROLES)
def test_every_role_round_trips(tmp_path: Path, role: str) -> None:
    ca.init_ca(tmp_path)
    cert_path, _ = ca.issue(tmp_path, "x", role, ["x.example.com"])
    assert ca.load_identity(cert_path.read_bytes()).role == role


def test_issue_days(tmp_path: Path) -> None:
    ca.init_ca(tmp_path)
    cert_path, _ = ca.issue(tmp_path, "short", "node", ["s.example.com"], days=7)
    ident = ca.load_identity(cert_path.read_bytes())
    assert 6 <= (ident.not_after - ident.not_before).days <= 7


def test_issue_without_ca_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run `ntm pki init --dir .*` first"):
        ca.issue(tmp_path, "mn1", "node", ["mn1.example.com"])


def test_unknown_role(tmp_path: Path) -> None:
    ca.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="unknown role 'admin'"):
        ca.issue(tmp_path, "x", "admin", ["x.example.com"])


@pytest.mark.parametrize(
    "fqdn",
    [
        "",
        "-a.example.com",
        "a-.example.com",
        "a..example.com",
        "*.example.com",
        "under_score.example.com",
        "198.51.100.1",
        "x" * 64 + ".example.com",
        "host.123",
        "sp ace.example.com",
        ("a" * 60 + ".") * 5 + "com",
    ],
)
def test_bad_fqdn(tmp_path: Path, fqdn: str) -> None:
    ca.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="not a valid FQDN"):
        ca.issue(tmp_path, "x", "node", [fqdn])


def test_bad_ip_and_names(tmp_path: Path) -> None:
    ca.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="not an IP address"):
        ca.issue(tmp_path, "x", "node", [], ["300.1.1.1"])
    with pytest.raises(ConfigError, match="reserved"):
        ca.issue(tmp_path, "ca", "node", ["x.example.com"])
    with pytest.raises(ConfigError, match="not usable"):
        ca.issue(tmp_path, "../x", "node", ["x.example.com"])
    with pytest.raises(ConfigError, match="no names"):
        ca.issue(tmp_path, "x", "node", [], [])


def test_load_identity_rejects_non_identities(tmp_path: Path) -> None:
    ca.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="no NTM role"):
        ca.load_identity((tmp_path / "ca.pem").read_bytes())
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        ca.load_identity(b"garbage")


@given(st.text(max_size=80))
def test_check_fqdn_is_idempotent_or_refuses(text: str) -> None:
    try:
        fqdn = ca.check_fqdn(text)
    except ConfigError:
        return
    assert ca.check_fqdn(fqdn) == fqdn
    assert fqdn == fqdn.lower() and not fqdn.endswith(".")


@given(
    st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), min_size=1),
    st.sampled_from(["com", "net", "example"]),
)
def test_check_fqdn_accepts_ldh_names(labels: list[str], tld: str) -> None:
    name = ".".join([*labels, tld])
    if len(name) <= 253:
        assert ca.check_fqdn(name.upper() + ".") == name


# ---------------------------------------------------------------- batch


def test_batch_is_idempotent(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    pki = tmp_path / "pki"
    first = ca.batch(pki, spec)
    assert first.ca_created and first.issued == ("dc1", "mn1") and first.kept == ()
    assert _cert(pki / "ca.pem").subject.rfc4514_string() == "CN=Test Lab CA"
    before = _fingerprints(pki)
    second = ca.batch(pki, spec)
    assert not second.ca_created and second.issued == () and second.kept == ("dc1", "mn1")
    assert _fingerprints(pki) == before
    dc1 = ca.load_identity((pki / "dc1.pem").read_bytes())
    assert dc1.role == "dc" and dc1.ip_addresses == {"198.51.100.20", "2001:db8:100::20"}


def test_batch_reissues_only_what_changed(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    pki = tmp_path / "pki"
    ca.batch(pki, spec)
    ca_before = (pki / "ca.pem").read_bytes()
    mn1_before = (pki / "mn1.pem").read_bytes()

    spec.write_text(SPEC.replace('"dc1.ntm.example.com"', '"dc1.ntm.example.com", "dc.x.org"'))
    result = ca.batch(pki, spec)
    assert result.issued == ("dc1",) and result.kept == ("mn1",)
    assert (pki / "ca.pem").read_bytes() == ca_before  # an existing CA is kept
    assert (pki / "mn1.pem").read_bytes() == mn1_before
    assert "dc.x.org" in ca.load_identity((pki / "dc1.pem").read_bytes()).dns_names

    (pki / "mn1.pem").unlink()
    assert ca.batch(pki, spec).issued == ("mn1",)
    (pki / "mn1.key").write_bytes((pki / "dc1.key").read_bytes())  # key no longer matches
    assert ca.batch(pki, spec).issued == ("mn1",)


def test_batch_reissues_after_ca_replacement(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    ca.batch(tmp_path, spec)
    ca.init_ca(tmp_path, force=True)
    assert ca.batch(tmp_path, spec).issued == ("dc1", "mn1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[identity]]\nname = "a"\nrole = "boss"\ndns = ["a.example.com"]', "unknown role"),
        ('[[identity]]\nname = "a"\nrole = "node"\ndns = "a.example.com"', "list of strings"),
        ('[[identity]]\nname = "a"\nrole = "node"\ndns = ["a.b"]\ncolour = 1', "unknown key"),
        ('[[identity]]\nrole = "node"\ndns = ["a.example.com"]', "name is missing"),
        (
            '[[identity]]\nname = "a"\nrole = "node"\ndns = ["a.b.c"]\n'
            '[[identity]]\nname = "a"\nrole = "node"\ndns = ["a.b.c"]',
            "more than once",
        ),
        ("[cas]\nname = 'x'", "unknown table"),
        ("[ca\n", "not valid TOML"),
    ],
)
def test_batch_spec_errors(tmp_path: Path, text: str, message: str) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=message):
        ca.batch(tmp_path / "pki", spec)


# ---------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = str(tmp_path / "pki")
    assert ntm_main(["pki", "init", "--dir", pki, "--name", "CLI CA"]) == 0
    assert ntm_main(["pki", "init", "--dir", pki]) == 2
    assert "--force" in capsys.readouterr().err
    argv = ["pki", "issue", "--dir", pki, "--name", "cn2", "--role", "node"]
    assert ntm_main([*argv, "--dns", "cn2.ntm.example.com", "--ip", "198.51.100.30"]) == 0
    capsys.readouterr()
    assert ntm_main(["pki", "show", f"{pki}/cn2.pem"]) == 0
    out = capsys.readouterr().out
    assert "role:      node" in out
    assert "cn2.ntm.example.com" in out and "198.51.100.30" in out
    assert "CN=cn2,OU=node" in out or "OU=node,CN=cn2" in out
    assert ntm_main(["pki", "show", f"{pki}/ca.pem"]) == 0
    assert "(certificate authority)" in capsys.readouterr().out
    assert ntm_main([*argv, "--dns", "bad_name.example.com"]) == 2
    assert "not a valid FQDN" in capsys.readouterr().err


def test_cli_batch_and_missing_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    pki = str(tmp_path / "pki")
    assert ntm_main(["pki", "batch", "--dir", pki, "--spec", str(spec)]) == 0
    assert "CA created; issued 2" in capsys.readouterr().out
    assert ntm_main(["pki", "batch", "--dir", pki, "--spec", str(spec)]) == 0
    assert "CA kept; issued 0 (-); kept 2" in capsys.readouterr().out
    empty = str(tmp_path / "empty")
    argv = ["pki", "issue", "--dir", empty, "--name", "x", "--role", "node", "--dns", "x.y.z"]
    assert ntm_main(argv) == 2
    assert f"run `ntm pki init --dir {empty}` first" in capsys.readouterr().err
