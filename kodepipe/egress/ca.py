"""A certificate authority that lives as long as one run: interception mode's trust anchor.

Made on the host when the run starts, its private key is held in kp-run's memory only (the proxy's), and
is gone when the run ends; the container gets the CA's certificate alone.  It can sign for nothing but
the hosts of the run's intercepting credentials: its name constraints say so, and strict clients
(OpenSSL 3, Go, rustls) check them.  The extensions are those such clients ask of a CA: basicConstraints
CA:TRUE (critical, pathlen 0), keyUsage keyCertSign and cRLSign (critical), subject and authority key
identifiers; each leaf has subjectAltName, extendedKeyUsage serverAuth, keyUsage digitalSignature, and a
lifetime that covers the run, backdated an hour for clocks that lag.

``server_context(host)`` is an ``ssl.SSLContext`` for the proxy's side of an intercepted connection.  A
context loads its key from a file only: the leaf's key goes through a memfd (an anonymous file in
memory, closed once loaded), never through the disk.
"""

from __future__ import annotations

import datetime
import os
import ssl
from collections.abc import Iterable

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's, on the host
LIFETIME = datetime.timedelta(days=2)  # longer than any run's limit; the CA is dropped with the run anyway
BACKDATE = datetime.timedelta(hours=1)


class RunCA:
    def __init__(self, hosts: Iterable[str], run: str = "run") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.hosts = tuple(sorted(set(hosts)))
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kodepipe"),
                                x509.NameAttribute(NameOID.COMMON_NAME, f"kodepipe run CA {run}"[:64])])
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .add_extension(x509.NameConstraints(permitted_subtrees=[x509.DNSName(h) for h in self.hosts],
                                                excluded_subtrees=None), critical=True)
            .sign(self._key, hashes.SHA256()))
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._contexts: dict[str, ssl.SSLContext] = {}

    def leaf(self, host: str) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for ``host``, one of the CA's hosts."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        if not any(host == h or host.endswith("." + h) for h in self.hosts):
            raise ValueError(f"the run's CA does not sign for {host}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        ca_public = self._key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
            .sign(self._key, hashes.SHA256()))
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))

    def bundle(self, system: str = SYSTEM_BUNDLE) -> bytes:
        """The container's trust store: the host's CAs (every other host stays verified end to end) and
        this run's CA, last."""
        try:
            with open(system, "rb") as handle:
                data = handle.read(16 << 20)
        except OSError:
            data = b""
        return data + (b"" if not data or data.endswith(b"\n") else b"\n") + self.pem

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting ``host``'s leaf (and the CA after it), made once per host."""
        context = self._contexts.get(host)
        if context is None:
            cert, key = self.leaf(host)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["http/1.1"])  # one request per connection, in HTTP/1.1
            fd = os.memfd_create(f"kp-leaf-{host}"[:200], os.MFD_CLOEXEC)
            try:
                os.write(fd, cert + self.pem + key)
                context.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            self._contexts[host] = context
        return context
