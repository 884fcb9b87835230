"""TLS on `headway serve`, `headway route` and `headway up`: HTTPS with a private CA works (the
official openai client, the control CLI), plaintext to the same port fails, and half a TLS
configuration is a clear error before anything starts."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from headway.tls import TLSConfigError, ca_file, server_tls
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow
MODEL = "tinycoder-test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(root: Path) -> dict[str, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost: PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("headway test CA")).issuer_name(_name("headway test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Https:
    """`python -m headway ARGS` serving HTTPS on a chosen port."""

    def __init__(self, args: list[str], log: Path, ca: Path):
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ca = ca
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "headway", *args, "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait(self, path: str = "/health/ready", timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + path, verify=str(self.ca), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def plaintext_fails(port: int) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5)


def complete(base: str, ca: Path) -> str:
    """A completion and a streamed one through the official openai client, trusting only `ca`."""
    import openai

    with httpx.Client(verify=str(ca)) as http:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", http_client=http, max_retries=0)
        reply = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=4)
        streamed = [c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="def add(a, b):", max_tokens=4, stream=True) if c.choices]
    assert reply.choices[0].text and streamed
    return reply.choices[0].text


def test_half_a_tls_configuration_is_a_clear_error(pki: dict[str, Path], tmp_path: Path) -> None:
    assert server_tls(None, None) is None
    assert server_tls(pki["cert"], pki["key"]) is not None
    with pytest.raises(TLSConfigError, match="--tls-cert needs --tls-key"):
        server_tls(pki["cert"], None)
    with pytest.raises(TLSConfigError, match="--tls-key needs --tls-cert"):
        server_tls(None, pki["key"])
    with pytest.raises(TLSConfigError, match="no such file"):
        server_tls(tmp_path / "nope.pem", pki["key"])
    with pytest.raises(TLSConfigError, match="cannot load"):
        server_tls(pki["ca"], pki["key"])                 # the key does not belong to that certificate
    with pytest.raises(TLSConfigError, match="--ca-file .*no such file"):
        ca_file(tmp_path / "nope.pem")
    for args in (["serve", MODEL, "--tls-cert", str(pki["cert"])],
                 ["route", "--replica", "https://127.0.0.1:1", "--tls-key", str(pki["key"])],
                 ["up", "--state-dir", str(tmp_path / "s"), "--tls-cert", str(pki["cert"]),
                  "--tls-key", str(tmp_path / "missing.key")]):
        done = subprocess.run([sys.executable, "-m", "headway", *args], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert done.returncode == 2 and "--tls-" in done.stderr, (args, done.stderr)


@pytest.fixture(scope="module")
def replica(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Https]:
    tmp = tmp_path_factory.mktemp("tls")
    rep = Https(["serve", MODEL, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])], tmp / "replica.log",
                pki["ca"])
    try:
        rep.wait()
        yield rep
    finally:
        rep.stop()


def test_serve_over_tls(replica: Https, pki: dict[str, Path]) -> None:
    assert complete(replica.url, pki["ca"])
    plaintext_fails(replica.port)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(replica.url + "/health/live", timeout=5)      # a client that does not trust the CA


def test_route_over_tls_to_tls_replicas(replica: Https, pki: dict[str, Path], tmp_path: Path) -> None:
    grpc_port = free_port()
    front = Https(["route", "--replica", replica.url, "--ca-file", str(pki["ca"]), "--tls-cert", str(pki["cert"]),
                   "--tls-key", str(pki["key"]), "--health-interval", "0.2", "--log-level", "warning",
                   "--grpc-port", str(grpc_port)],
                  tmp_path / "router.log", pki["ca"])
    untrusting = Https(["route", "--replica", replica.url, "--health-interval", "0.2", "--log-level", "warning"],
                       tmp_path / "router-untrusting.log", pki["ca"])
    untrusting.url = untrusting.url.replace("https", "http")
    try:
        front.wait()
        assert complete(front.url, pki["ca"])
        plaintext_fails(front.port)
        # the gRPC port speaks TLS too
        import grpc

        from headway.infra.router.proto import router_pb2, router_pb2_grpc

        body = b'{"model": "tinycoder-test", "prompt": "x", "max_tokens": 2}'
        request = router_pb2.PredictRequest(model=MODEL, path="/v1/completions", body=body)
        creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", creds) as channel:
            assert router_pb2_grpc.RouterStub(channel).Predict(request, timeout=30).status == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            with pytest.raises(grpc.RpcError):
                router_pb2_grpc.RouterStub(channel).Predict(request, timeout=10)
        # without --ca-file the router does not trust the replica's certificate: no healthy replica
        untrusting.wait("/health/live", timeout=30)
        time.sleep(1.0)
        r = httpx.get(untrusting.url + "/headway/router", timeout=5).json()["replicas"][0]
        assert r["healthy"] is False and "CERTIFICATE_VERIFY_FAILED" in r["last_error"], r
    finally:
        front.stop()
        untrusting.stop()


def test_up_over_tls_and_the_control_cli(pki: dict[str, Path], tmp_path: Path) -> None:
    plane = Https(["up", "--state-dir", str(tmp_path / "state"), "--tls-cert", str(pki["cert"]), "--tls-key",
                   str(pki["key"]), "--log-level", "warning"], tmp_path / "plane.log", pki["ca"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEADWAY_CONTROL": plane.url}
    env.pop("HEADWAY_CA_FILE", None)
    env.pop("SSL_CERT_FILE", None)

    def status(*extra: str, **more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "headway", "status", *extra], capture_output=True, text=True,
                              cwd=ROOT, env={**env, **more}, timeout=60)

    try:
        plane.wait("/health/live", timeout=60)
        plaintext_fails(plane.port)
        assert "no deployments" in (done := status("--ca-file", str(pki["ca"]))).stdout, done.stderr
        assert "no deployments" in (done := status(HEADWAY_CA_FILE=str(pki["ca"]))).stdout, done.stderr
        untrusted = status()
        assert untrusted.returncode == 2 and "--ca-file" in untrusted.stderr, untrusted.stderr
        plain = status("--control", plane.url.replace("https", "http"), "--ca-file", str(pki["ca"]))
        assert plain.returncode == 2 and "https://" in plain.stderr, plain.stderr
    finally:
        plane.stop()
