"""TLS for Headway's servers (`serve`, `route`, `up`) and the clients that call them.

Servers: `--tls-cert FILE --tls-key FILE` (PEM), checked before anything starts (`server_tls`);
with them the port speaks HTTPS only, and a plaintext connection fails its handshake.

Clients (the router's upstream connections, the control CLI): a private CA comes from
`--ca-file`, else `HEADWAY_CA_FILE`, else `SSL_CERT_FILE`; without one the system's (router) or
certifi's (httpx) trust store is used (`ca_file`, `client_context`).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

CA_ENV = "HEADWAY_CA_FILE"


class TLSConfigError(ValueError):
    """A TLS option that cannot work; the message says which and how to fix it."""


class UvicornTLS(TypedDict, total=False):
    """The keyword arguments `uvicorn.run` takes for HTTPS (none: plain HTTP)."""

    ssl_certfile: str
    ssl_keyfile: str


@dataclass(frozen=True)
class ServerTLS:
    cert: str
    key: str

    def uvicorn_options(self) -> UvicornTLS:
        return {"ssl_certfile": self.cert, "ssl_keyfile": self.key}


def server_tls(cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None) -> ServerTLS | None:
    """The server's certificate and key, loaded once to catch every mistake early; None when
    neither is given. Raises TLSConfigError when one is missing, unreadable or they do not match."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if cert is not None else ("--tls-key", "--tls-cert")
        raise TLSConfigError(f"{given} needs {missing} too: TLS takes the certificate (PEM, with any intermediate "
                             "certificates) and its private key, e.g. --tls-cert server.pem --tls-key server.key")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise TLSConfigError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"--tls-cert {cert} / --tls-key {key}: cannot load them as a PEM certificate and "
                             f"its private key ({exc}); check that the key belongs to the certificate") from None
    return ServerTLS(str(cert), str(key))


def ca_file(explicit: str | os.PathLike[str] | None = None) -> str | None:
    """The CA bundle a client should trust: --ca-file, else $HEADWAY_CA_FILE, else $SSL_CERT_FILE."""
    for where, value in (("--ca-file", explicit), (CA_ENV, os.environ.get(CA_ENV)),
                         ("SSL_CERT_FILE", os.environ.get("SSL_CERT_FILE"))):
        if value:
            if not Path(value).is_file():
                raise TLSConfigError(f"{where} {value}: no such file (a PEM bundle of CA certificates)")
            return str(value)
    return None


def client_context(explicit: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A verifying client context trusting ca_file(explicit), or the default trust store."""
    path = ca_file(explicit)
    try:
        return ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"CA file {path}: cannot load it as PEM certificates ({exc})") from None
