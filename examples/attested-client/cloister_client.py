#!/usr/bin/env python3
"""An attested-channel client written from docs/attested-channel.md alone, on
independent libraries (cbor2, cryptography, pyhpke, requests): none of
Cloister's code.

It asks the relay for an attestation document over a fresh nonce, verifies it
(certificate chain to the given root, COSE_Sign1 signature, age, nonce, the
expected PCRs, not a debug enclave), takes the channel key the document binds,
sends the request as a Binary HTTP POST encapsulated with Oblivious HTTP
(RFC 9458) and opens the answer. The relay sees ciphertext.

    python cloister_client.py --relay http://127.0.0.1:8080 --root root.pem \\
        --expect-pcr 0=HEX [--expect-pcr 2=HEX] [--input record.csv]

Prints the workload's response on stdout; on a refusal prints
`error[CODE]: message` on stderr and exits 1.
"""

import argparse
import datetime
import os
import sys

import cbor2
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0002  # X25519, HKDF-SHA256, AES-256-GCM
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
NK, NN = 32, 12


# The PCRs that name the image (PCR1 names the runtime, PCR3/4 the parent's
# choices): a client must pin at least one.
IMAGE_PCRS = {0, 2, 8}


class Refused(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


# --- the attestation document (AWS Nitro's format) -------------------------


def verify_document(document, nonce, root_pem, expected_pcrs, max_age_s, allow_debug=False):
    """Checks a COSE_Sign1 attestation document; returns its payload."""
    cose = cbor2.loads(document)
    if isinstance(cose, cbor2.CBORTag):
        if cose.tag != 18:
            raise Refused("E-ATTEST-COSE", f"CBOR tag {cose.tag}, not COSE_Sign1 (18)")
        cose = cose.value
    if not isinstance(cose, list) or len(cose) != 4:
        raise Refused("E-ATTEST-COSE", "not a COSE_Sign1 array of four")
    protected, _unprotected, payload_bytes, signature = cose
    alg = cbor2.loads(protected).get(1)
    payload = cbor2.loads(payload_bytes)

    # The chain: cabundle[0] is the root the client trusts, each certificate
    # issued by the one before, the signing certificate last.
    root = x509.load_pem_x509_certificate(root_pem)
    bundle = [x509.load_der_x509_certificate(c) for c in payload["cabundle"]]
    leaf = x509.load_der_x509_certificate(payload["certificate"])
    if not bundle or bundle[0].public_bytes(Encoding.DER) != root.public_bytes(Encoding.DER):
        raise Refused("E-ATTEST-UNTRUSTED-ROOT", "cabundle[0] is not the trusted root")
    now = datetime.datetime.now(datetime.timezone.utc)
    chain = bundle + [leaf]
    for issuer, cert in zip(chain, chain[1:]):
        try:
            cert.verify_directly_issued_by(issuer)
        except Exception as e:  # noqa: BLE001 - any failure is a refusal
            raise Refused("E-ATTEST-CHAIN", f"{cert.subject.rfc4514_string()}: {e}") from e
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Refused("E-ATTEST-CERTIFICATE-EXPIRED", cert.subject.rfc4514_string())
    # Every cabundle certificate is a CA that may sign certificates (and no
    # deeper than its pathLenConstraint allows); the signing certificate is not
    # a CA and may sign (RFC 5280 §4.2.1.3, §4.2.1.9).
    for depth, cert in enumerate(chain):
        constraints = extension(cert, x509.BasicConstraints)
        usage = extension(cert, x509.KeyUsage)
        name = cert.subject.rfc4514_string()
        if cert is leaf:
            if constraints is not None and constraints.ca:
                raise Refused("E-ATTEST-CERTIFICATE", f"{name}: the signing certificate is a CA")
            if usage is not None and not usage.digital_signature:
                raise Refused("E-ATTEST-CERTIFICATE", f"{name}: keyUsage lacks digitalSignature")
        else:
            if constraints is None or not constraints.ca:
                raise Refused("E-ATTEST-CERTIFICATE", f"{name}: a cabundle certificate is not a CA")
            if usage is not None and not usage.key_cert_sign:
                raise Refused("E-ATTEST-CERTIFICATE", f"{name}: keyUsage lacks keyCertSign")
            below = len(chain) - depth - 2  # CA certificates under this one
            if constraints.path_length is not None and below > constraints.path_length:
                raise Refused("E-ATTEST-CERTIFICATE", f"{name}: pathLenConstraint exceeded")

    # The COSE signature over Sig_structure (RFC 9052 §4.4).
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload_bytes])
    key = leaf.public_key()
    try:
        if alg == -8 and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, to_be_signed)
        elif (
            alg == -35
            and isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, ec.SECP384R1)
            and len(signature) == 96
        ):
            half = len(signature) // 2
            der = encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
            key.verify(der, to_be_signed, ec.ECDSA(hashes.SHA384()))
        else:
            raise Refused("E-ATTEST-ALGORITHM", f"algorithm {alg} with a {type(key).__name__}")
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001
        raise Refused("E-ATTEST-SIGNATURE", "the COSE signature does not verify") from e

    issued = payload["timestamp"] / 1000.0
    age = now.timestamp() - issued
    if age > max_age_s or age < -60:
        raise Refused("E-ATTEST-STALE", f"the document is {age:.0f} s old")
    if payload.get("nonce") != nonce:
        raise Refused("E-ATTEST-NONCE", "the document answers another challenge")
    pcrs = payload["pcrs"]
    if not allow_debug and all(pcrs.get(i) == bytes(48) for i in range(3)):
        raise Refused("E-ATTEST-DEBUG-ENCLAVE", "PCR0..2 are zero: a debug-mode enclave")
    for index, value in expected_pcrs.items():
        if pcrs.get(index) != value:
            raise Refused("E-ATTEST-PCR-MISMATCH", f"PCR{index} is {pcrs.get(index, b'').hex()}")
    return payload


def extension(cert, kind):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def channel_key(payload):
    """The key configuration in user_data, bound to public_key (RFC 9458 §3)."""
    config, public_key = payload.get("user_data"), payload.get("public_key")
    if not config or not public_key or len(config) != 41:
        raise Refused("E-CHANNEL-KEY-BINDING", "no channel key configuration")
    key_id = config[0]
    expected = (
        bytes([key_id])
        + KEM_ID.to_bytes(2, "big")
        + public_key
        + (4).to_bytes(2, "big")
        + KDF_ID.to_bytes(2, "big")
        + AEAD_ID.to_bytes(2, "big")
    )
    if config != expected:
        raise Refused("E-CHANNEL-KEY-BINDING", "user_data does not configure public_key")
    return key_id, public_key


# --- Binary HTTP (RFC 9292), known-length messages -------------------------


def varint(n):
    if n < 1 << 6:
        return n.to_bytes(1, "big")
    if n < 1 << 14:
        return (n | 0x4000).to_bytes(2, "big")
    if n < 1 << 30:
        return (n | 0x80000000).to_bytes(4, "big")
    return (n | 0xC000000000000000).to_bytes(8, "big")


def read_varint(data, at):
    prefix = data[at] >> 6
    length = 1 << prefix
    value = int.from_bytes(data[at : at + length], "big") & ((1 << (8 * length - 2)) - 1)
    return value, at + length


def vbytes(b):
    return varint(len(b)) + b


def read_vbytes(data, at):
    n, at = read_varint(data, at)
    if at + n > len(data):
        raise Refused("E-CHANNEL-RESPONSE", "a truncated Binary HTTP field")
    return data[at : at + n], at + n


def bhttp_post(body):
    fields = vbytes(b"content-type") + vbytes(b"application/octet-stream")
    return (
        varint(0)  # known-length request
        + vbytes(b"POST")
        + vbytes(b"https")
        + vbytes(b"enclave")
        + vbytes(b"/")
        + vbytes(fields)
        + vbytes(body)
        + varint(0)  # no trailers
    )


def read_fields(data, at):
    section, at = read_vbytes(data, at)
    fields, i = {}, 0
    while i < len(section):
        name, i = read_vbytes(section, i)
        value, i = read_vbytes(section, i)
        fields[name.lower()] = value
    return fields, at


def bhttp_response(data):
    framing, at = read_varint(data, 0)
    if framing != 1:
        raise Refused("E-CHANNEL-RESPONSE", f"framing indicator {framing}, not a known-length response")
    while True:
        status, at = read_varint(data, at)
        fields, at = read_fields(data, at)
        if not 100 <= status < 200:
            break
    content, at = read_vbytes(data, at) if at < len(data) else (b"", at)
    return status, fields, content


# --- Oblivious HTTP (RFC 9458) ----------------------------------------------


def encapsulate(key_id, public_key, request):
    header = bytes([key_id]) + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
    info = b"message/bhttp request\x00" + header
    pk = SUITE.kem.deserialize_public_key(public_key)
    enc, context = SUITE.create_sender_context(pk, info=info)
    return header + enc + context.seal(request, aad=b""), (context, enc)


def decapsulate(state, response):
    context, enc = state
    secret = context.export(b"message/bhttp response", max(NN, NK))
    response_nonce, ct = response[: max(NN, NK)], response[max(NN, NK) :]
    salt = enc + response_nonce
    key = HKDF(algorithm=hashes.SHA256(), length=NK, salt=salt, info=b"key").derive(secret)
    nonce = HKDF(algorithm=hashes.SHA256(), length=NN, salt=salt, info=b"nonce").derive(secret)
    try:
        return AESGCM(key).decrypt(nonce, ct, b"")
    except Exception as e:  # noqa: BLE001
        raise Refused("E-CHANNEL-RESPONSE", "the answer does not open") from e


# --- the exchange -------------------------------------------------------------


def call(relay, root_pem, expected_pcrs, body, max_age_s=300):
    if not set(expected_pcrs) & IMAGE_PCRS:
        raise Refused("E-CHANNEL-EXPECTATION", "expect PCR0, PCR2 or PCR8")
    nonce = os.urandom(32)
    r = requests.get(f"{relay}/.well-known/cloister-attestation", params={"nonce": nonce.hex()}, timeout=60)
    if r.status_code != 200:
        raise Refused(r.headers.get("cloister-error", "E-PROTO-IO"), f"HTTP {r.status_code}: {r.text.strip()}")
    payload = verify_document(r.content, nonce, root_pem, expected_pcrs, max_age_s)
    key_id, public_key = channel_key(payload)
    request, state = encapsulate(key_id, public_key, bhttp_post(body))
    r = requests.post(
        f"{relay}/.well-known/ohttp-gateway",
        data=request,
        headers={"content-type": "message/ohttp-req"},
        timeout=120,
    )
    if r.status_code != 200:
        raise Refused(r.headers.get("cloister-error", "E-PROTO-IO"), f"HTTP {r.status_code}: {r.text.strip()}")
    if r.headers.get("content-type") != "message/ohttp-res":
        raise Refused("E-CHANNEL-RESPONSE", f"content-type {r.headers.get('content-type')}")
    status, fields, content = bhttp_response(decapsulate(state, r.content))
    if status != 200:
        code = fields.get(b"cloister-error", b"E-CHANNEL-REFUSED").decode()
        raise Refused(code, content.decode("utf-8", "replace"))
    return content, payload


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--relay", required=True, help="the relay's base URL")
    p.add_argument("--root", required=True, help="the platform root certificate (PEM)")
    p.add_argument("--expect-pcr", action="append", default=[], metavar="N=HEX")
    p.add_argument("--input", help="the request (default: standard input)")
    p.add_argument("--max-age", type=int, default=300)
    a = p.parse_args()
    expected = {int(k): bytes.fromhex(v) for k, v in (x.split("=", 1) for x in a.expect_pcr)}
    if not set(expected) & IMAGE_PCRS:
        p.error("expect PCR0, PCR2 or PCR8: a PCR that names the image")
    with open(a.root, "rb") as f:
        root_pem = f.read()
    if a.input:
        with open(a.input, "rb") as f:
            body = f.read()
    else:
        body = sys.stdin.buffer.read()
    try:
        content, payload = call(a.relay, root_pem, expected, body, a.max_age)
    except Refused as e:
        print(f"error[{e.code}]: {e}", file=sys.stderr)
        return 1
    print(f"verified {payload['module_id']} PCR0 {payload['pcrs'][0].hex()}", file=sys.stderr)
    sys.stdout.buffer.write(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
