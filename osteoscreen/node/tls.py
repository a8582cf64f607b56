"""DICOM TLS (PS3.15 Annex B, secure transport connection profiles): `ssl` contexts for the listener
and the sender, built from PEM files named in the `tls` settings.

Both sides speak TLS 1.2 or newer with Python's default cipher list, which overlaps DCMTK's default
"Non-downgrading BCP 195" profile (ECDHE with AES-GCM). The same certificate and key identify the
node as a server (listener) and as a client (sender, when a destination asks for TLS); the same CA
bundle decides which peers are trusted in both directions.
"""
from __future__ import annotations

import ssl

from ..config import TLS


def server_context(tls: TLS) -> ssl.SSLContext:
    """The listener's context: our certificate; client certificates verified against
    tls.ca_certificates (required when tls.require_client_certificate, else checked when offered)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TLS | None) -> ssl.SSLContext:
    """The sender's context: the destination's certificate is verified against tls.ca_certificates
    (the system trust store when none is named) and, with tls.check_hostname, against the host name
    or address the destination is configured with; our certificate is presented when configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.ca_certificates:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = True if tls is None else bool(tls.check_hostname)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if tls is not None and tls.certificate and tls.private_key:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx
