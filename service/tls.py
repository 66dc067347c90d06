"""The server's TLS credentials, checked at start so a bad file is named.

gRPC reads the PEM files only when it binds, and a swapped, mismatched or
unparsable file then surfaces as "Failed to bind to address". Python's `ssl`
(the same OpenSSL) loads them first: each problem becomes a ConfigError that
names the key, the file and what is wrong.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from trtserve.service.config import TlsConfig
from trtserve.service.errors import ConfigError

_CERT = b"-----BEGIN CERTIFICATE-----"
_KEY = b"PRIVATE KEY-----"


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """gRPC credentials for `tls` (enabled), after `check` found every file usable."""
    check(tls)
    ca = read_pem("client_ca_file", tls.client_ca_file) if tls.client_ca_file else None
    pair = (read_pem("key_file", tls.key_file), read_pem("cert_file", tls.cert_file))
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """An `ssl` server context for `tls` (enabled), for the HTTP frontend: the same
    certificate, key and client CA as gRPC's credentials, after `check`."""
    check(tls)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def check(tls: TlsConfig) -> None:
    """Raise ConfigError naming the file unless the certificate, its key and the client
    CA (if set) load, and the key belongs to the certificate."""
    if not tls.enabled:
        return
    cert = read_pem("cert_file", tls.cert_file)
    key = read_pem("key_file", tls.key_file)
    if _CERT not in cert:
        swapped = " (it holds a private key: are cert_file and key_file swapped?)" \
            if _KEY in cert else ""
        raise ConfigError(f"server.tls.cert_file: {tls.cert_file} holds no PEM certificate"
                          f"{swapped}")
    if _KEY not in key:
        swapped = " (it holds a certificate: are cert_file and key_file swapped?)" \
            if _CERT in key else ""
        raise ConfigError(f"server.tls.key_file: {tls.key_file} holds no PEM private key"
                          f"{swapped}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    encrypted = []

    def no_password() -> bytes:
        # Called only for an encrypted key; without it OpenSSL would prompt on the tty.
        encrypted.append(True)
        return b""

    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=no_password)
    except ssl.SSLError as e:
        if encrypted:
            raise ConfigError(f"server.tls.key_file: {tls.key_file} is encrypted; give the "
                              "server an unencrypted key (protected by file permissions)") from None
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"server.tls.key_file: {tls.key_file} is not the key of the "
                              f"certificate in {tls.cert_file}") from None
        raise ConfigError(f"server.tls: cannot load the certificate {tls.cert_file} with the "
                          f"key {tls.key_file}: {_reason(e)}") from None
    if tls.client_ca_file:
        ca = read_pem("client_ca_file", tls.client_ca_file)
        if _CERT not in ca:
            raise ConfigError(f"server.tls.client_ca_file: {tls.client_ca_file} holds no PEM "
                              "certificate")
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as e:
            raise ConfigError(f"server.tls.client_ca_file: cannot load {tls.client_ca_file}: "
                              f"{_reason(e)}") from None


def read_pem(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"server.tls.{key}: cannot read {path}: {e.strerror}") from None


def _reason(error: ssl.SSLError) -> str:
    return (error.reason or str(error)).replace("_", " ").lower()
