"""Certificates, allow-list, coordinator settings, hospital preflight and the warm executor's code
check: the parts of a deployment that need no running Flower process."""

from __future__ import annotations

import io
import socket
import ssl
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedmira.client.hospital import (
    FAILURES,
    Hospital,
    SuperNodeProcess,
    check_connection,
    check_credentials,
    split_file,
    stopped_text,
    supernode_command,
)
from fedmira.client.warm_executor import CodeMismatch, check_code, fab_code, installed_code
from fedmira.common.compose import compose_config
from fedmira.common.errors import ConfigError, DataError, FedmiraError
from fedmira.server.certs import ALLOW_LIST, make_dev_pki, read_allow_list
from fedmira.server.coordinator import CoordinatorTls, deployment_config, parse_address, resolve_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_dev_pki(tmp_path_factory.mktemp("pki") / "pki", 2, hosts=("coord.example.org",))


def _hospital(pki, tmp_path: Path, **kw) -> Hospital:  # type: ignore[no-untyped-def]
    folder = pki.hospital_dirs[0]
    args = {"superlink": "127.0.0.1:1", "root_cert": folder / "ca.crt", "key": folder / "supernode_key",
            "data": tmp_path, "site_id": "st_marys", "workdir": tmp_path / "work"}
    args.update(kw)
    return Hospital(**args)


# ------------------------------------------------------------------------------ certs
def test_dev_pki_has_the_key_types_flower_reads(pki) -> None:  # type: ignore[no-untyped-def]
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert "coord.example.org" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_ssh_private_key((pki.hospital_dirs[0] / "supernode_key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key((pki.hospital_dirs[0] / "supernode_key.pub").read_bytes())
    # the bytes `flwr supernode register` stores and the SuperNode presents are the same
    assert public_key_to_bytes(public) == public_key_to_bytes(key.public_key())
    assert (pki.hospital_dirs[0] / "supernode_key").stat().st_mode & 0o077 == 0
    assert CoordinatorTls.from_dir(pki.root).check()  # chain and key match


def test_allow_list_names_and_errors(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert [n for n, _ in read_allow_list(pki.allow_list)] == ["hospital_01", "hospital_02"]
    bad = tmp_path / "list.txt"
    bad.write_text("# comment\nssh-rsa AAAA nope\n")
    with pytest.raises(FedmiraError, match="not an OpenSSH ECDSA public key"):
        read_allow_list(bad)
    with pytest.raises(FedmiraError, match="not found"):
        read_allow_list(tmp_path / "missing.txt")
    with pytest.raises(FedmiraError, match="already holds a CA"):
        make_dev_pki(pki.root, 1)


# ------------------------------------------------------------------------------ coordinator
def test_coordinator_settings(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert parse_address("0.0.0.0:9092") == ("0.0.0.0", 9092)
    with pytest.raises(ConfigError, match="host:port"):
        parse_address("9092")
    tls, path = resolve_settings({}, str(pki.root), None)
    assert path == pki.allow_list and tls.server_key.name == "server.key"
    again, same = resolve_settings({"tls": tls.to_dict(), "allow_list": str(path)}, None, None)
    assert again == tls and same == path
    with pytest.raises(FedmiraError, match="--certs"):
        resolve_settings({}, None, None)
    other = make_dev_pki(tmp_path / "other", 1)
    mixed = CoordinatorTls(pki.ca_cert, pki.server_cert, other.server_key)
    with pytest.raises(FedmiraError, match="is not the key of"):
        mixed.check()
    with pytest.raises(FedmiraError, match="not issued by a CA"):
        CoordinatorTls(other.ca_cert, pki.server_cert, pki.server_key).check()
    cfg = deployment_config(compose_config(["mode=deployment"]))
    assert cfg.run.name == "deployment" and cfg.mode.superlink
    with pytest.raises(ConfigError, match="mode=deployment"):
        deployment_config(compose_config([]))
    assert ALLOW_LIST == pki.allow_list.name


# ------------------------------------------------------------------------------ hospital
def test_hospital_splits_one_report_file(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parent.parent / "assets" / "tiny_reports.jsonl"
    h = Hospital("127.0.0.1:1", Path("ca"), Path("key"), src, "st_marys", tmp_path)
    folder = split_file(h, compose_config([]), io.StringIO())
    assert folder == tmp_path / "data" / "st_marys"
    train = (folder / "train.jsonl").read_text()
    assert train and '"site_id": "st_marys"' in train
    assert split_file(h, compose_config([]), io.StringIO()) == folder  # deterministic, rewritable


def test_a_bare_ris_export_splits_and_trains_at_a_hospital(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """Only accession, findings, impression (a common RIS export): the site is the hospital's,
    the exam "unknown", and the site-aware prompt says so."""
    import json

    from fedmira.common.engine import encode_reports, train_steps
    from fedmira.common.prompts import render_prompt
    from fedmira.common.reports import read_jsonl
    from tests.unit.test_optim import _model

    src = Path(__file__).resolve().parent.parent / "assets" / "tiny_reports.jsonl"
    bare = tmp_path / "export.jsonl"
    with open(bare, "w", encoding="utf-8") as f:
        for r in read_jsonl(src).reports:
            row = {"accession": r.report_id, "findings": r.findings, "impression": r.impression}
            f.write(json.dumps(row) + "\n")
    h = Hospital("127.0.0.1:1", Path("ca"), Path("key"), bare, "st_marys", tmp_path / "work")
    folder = split_file(h, compose_config([]), io.StringIO())
    train = read_jsonl(folder / "train.jsonl").reports
    assert train and {(r.site_id, r.modality, r.body_part, r.exam) for r in train} == {
        ("st_marys", "UN", "unknown", "unknown")}
    cfg = compose_config(["+debug=tiny"])
    assert "unknown modality" in render_prompt(train[0], tiny.tokenizer, "site_aware")
    examples = encode_reports(train, tiny.tokenizer, cfg.data)
    result = train_steps(_model(tiny), examples, cfg.train, tiny.device, int(tiny.tokenizer.pad_token_id),
                         steps=2)
    assert result.steps == 2 and result.mean_loss > 0


def test_hospital_credentials_and_node_config(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    check_credentials(_hospital(pki, tmp_path), out)
    assert "secp384r1" in out.getvalue()
    with pytest.raises(FedmiraError, match="not an unencrypted OpenSSH private key"):
        check_credentials(_hospital(pki, tmp_path, key=pki.server_key), out)
    with pytest.raises(FedmiraError, match="not found"):
        check_credentials(_hospital(pki, tmp_path, root_cert=tmp_path / "nope.crt"), out)
    cmd = supernode_command(_hospital(pki, tmp_path, data=Path('/d/"x"'), site_index=3), Path('/d/"x"'), 9999)
    config = cmd[cmd.index("--node-config") + 1]
    assert config == 'data-path="/d/\\"x\\"" site-id="st_marys" site-index=3'
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert _hospital(pki, tmp_path).index == _hospital(pki, tmp_path).index  # stable per site id
    assert any("allow-list" in text for _, text in FAILURES)


def test_a_supernode_the_superlink_forgot_says_why_on_the_hospital_console(pki, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 14: a SuperNode refused on its heartbeat (401, the SuperLink's database was replaced)
    ended with "The SuperNode stopped" and the cause only in supernode.log."""
    h = _hospital(pki, tmp_path)
    node = SuperNodeProcess(h, tmp_path, io.StringIO())
    node._interpret('HTTP Request: POST https://coord:9092/v1/fleet/send-node-heartbeat '
                    '"HTTP/1.1 401 Unauthorized"')
    assert node.failure is not None
    assert "no longer accepts" in node.failure and "mode.state_db" in node.failure
    quiet = SuperNodeProcess(h, tmp_path, io.StringIO())  # Flower ends itself without a 401 line
    quiet.node_id = "123"
    quiet.proc = subprocess.Popen([sys.executable, "-c", "pass"])
    quiet.proc.wait()
    text = stopped_text(quiet)
    assert "SuperNode 123 stopped by itself" in text and "HTTP 401" in text and "mode.state_db" in text
    quiet.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    quiet.proc.wait()
    assert "exited with code 3" in stopped_text(quiet)
    quiet.node_id = None
    assert "before it connected" in stopped_text(quiet)


def _tls_server(cert: Path, key: Path) -> tuple[int, threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def accept() -> None:
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass
        srv.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return srv.getsockname()[1], thread


def test_hospital_connection_errors_say_what_is_wrong(pki, tmp_path: Path) -> None:  # type: ignore
    port, thread = _tls_server(pki.server_cert, pki.server_key)
    out = io.StringIO()
    check_connection(_hospital(pki, tmp_path, superlink=f"127.0.0.1:{port}"), out)
    thread.join(5)
    assert "certificate verifies" in out.getvalue()

    other = make_dev_pki(tmp_path / "other", 1)
    port, thread = _tls_server(pki.server_cert, pki.server_key)
    with pytest.raises(FedmiraError, match="does not verify against"):
        wrong_ca = _hospital(pki, tmp_path, superlink=f"127.0.0.1:{port}", root_cert=other.ca_cert)
        check_connection(wrong_ca, out)
    thread.join(5)

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(FedmiraError, match="Nothing listens"):
        check_connection(_hospital(pki, tmp_path, superlink=f"127.0.0.1:{free}"), out)
    with pytest.raises(DataError):
        from fedmira.client.hospital import prepare_data

        prepare_data(_hospital(pki, tmp_path, data=tmp_path / "missing"), compose_config([]), out)


# ------------------------------------------------------------------------------ warm executor
def _fab(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


def test_warm_executor_runs_only_the_installed_code() -> None:
    root = Path(__file__).resolve().parents[2]
    files = {f"{p.parent.name}/{p.name}": p.read_bytes()
             for pkg in ("client", "common") for p in sorted((root / pkg).glob("*.py"))}
    fab = _fab({**files, "pyproject.toml": b"", "server/x.py": b"anything"})
    assert fab_code(fab) == installed_code()
    check_code("fedmira/fedmira", fab, installed_code())
    with pytest.raises(CodeMismatch, match="common/site.py"):
        check_code("fedmira/fedmira", _fab({**files, "common/site.py": b"evil = 1"}), installed_code())
    with pytest.raises(CodeMismatch, match="not fedmira"):
        check_code("someone/else", fab, installed_code())


# ------------------------------------------------------------------------------ command line
def test_deploy_cli_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmira.cli import main

    assert main(["certs", f"out={tmp_path / 'pki'}", "--names", "st_marys,north"]) == 0
    assert (tmp_path / "pki" / "hospitals" / "north" / "supernode_key").is_file()
    assert main(["certs", f"out={tmp_path / 'pki'}"]) == 2  # never overwrites a CA
    assert "already holds a CA" in capsys.readouterr().err
    folder = tmp_path / "pki" / "hospitals" / "north"
    code = main(["hospital", "--superlink", "no-port", "--root-cert", str(folder / "ca.crt"),
                 "--key", str(folder / "supernode_key"), "--data", str(tmp_path)])
    assert code == 2 and "is not host:port" in capsys.readouterr().err
    code = main(["coordinator", "--certs", str(tmp_path / "nowhere"), "+debug=tiny"])
    assert code == 2 and "no such folder" in capsys.readouterr().err
