"""Access handoff: the tenant's access request (SSH public keys, provider options) and the
access details a provider's hook answers with. Pure: validation and bounds only.

SSH keys are OpenSSH public key lines ("TYPE BASE64 [comment]", as in ~/.ssh/id_ed25519.pub).
The blob is decoded and checked (RFC 4253 6.6, RFC 5656 3.1, RFC 8709 4): its type string must
match the line's, an ed25519 key is 32 bytes, an ECDSA key names its own curve, an RSA modulus has
at least 3072 bits (NIST SP 800-57: 2048-bit RSA is not for use after 2030).
"""

from __future__ import annotations

import base64
import binascii
import re

from control_plane.domain import errors
from control_plane.domain.text import printable
from gpufed.v1 import lease_pb2

MAX_SSH_KEYS = 8
MAX_SSH_KEY_CHARS = 4096  # an RSA 8192 key line is about 1,400 characters
MIN_RSA_BITS = 3072
MAX_PROVIDER_OPTIONS = 16
MAX_OPTION_KEY_CHARS = 63
MAX_OPTION_VALUE_CHARS = 256
OPTION_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")

# What a hook may answer (longer is refused, not cut: a cut SSH line would be wrong).
MAX_SSH_CHARS = 512
MAX_ENDPOINT_CHARS = 512
MAX_INSTRUCTIONS_CHARS = 4096
MAX_HOOK_ERROR_CHARS = 1024

_ECDSA_CURVES = {
    "ecdsa-sha2-nistp256": b"nistp256",
    "ecdsa-sha2-nistp384": b"nistp384",
    "ecdsa-sha2-nistp521": b"nistp521",
}
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", *_ECDSA_CURVES)


class _Blob:
    """Reads the SSH wire format: uint32 length-prefixed strings."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def string(self) -> bytes:
        if self.at + 4 > len(self.data):
            raise ValueError("truncated")
        n = int.from_bytes(self.data[self.at : self.at + 4], "big")
        self.at += 4
        if n > len(self.data) - self.at:
            raise ValueError("truncated")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def done(self) -> bool:
        return self.at == len(self.data)


def ssh_key_problem(line: str) -> str | None:
    """Why this public key line is refused, or None when it is a valid, strong enough key."""
    if len(line) > MAX_SSH_KEY_CHARS:
        return f"longer than {MAX_SSH_KEY_CHARS} characters"
    if "\n" in line or "\r" in line or "\x00" in line:
        return "must be one line"
    parts = line.strip().split(None, 2)
    if len(parts) < 2:
        return "not an OpenSSH public key line (TYPE BASE64 [comment])"
    kind, b64 = parts[0], parts[1]
    if kind not in KEY_TYPES:
        return f"key type {kind[:40]!r} is not one of {', '.join(KEY_TYPES)}"
    try:
        blob = _Blob(base64.b64decode(b64, validate=True))
        if blob.string() != kind.encode():
            return "the key's blob names another type than its line"
        if kind == "ssh-ed25519":
            if len(blob.string()) != 32:
                return "an ed25519 key is 32 bytes"
        elif kind == "ssh-rsa":
            blob.string()  # e
            n = blob.string().lstrip(b"\x00")
            bits = int.from_bytes(n, "big").bit_length()
            if bits < MIN_RSA_BITS:
                return f"an RSA key needs at least {MIN_RSA_BITS} bits (this one has {bits})"
        else:
            if blob.string() != _ECDSA_CURVES[kind]:
                return "the ECDSA key names another curve than its type"
            point = blob.string()
            if not point or point[0] != 4:
                return "the ECDSA key is not an uncompressed point"
        if not blob.done():
            return "trailing bytes after the key"
    except (ValueError, binascii.Error):
        return "its base64 blob does not decode to a public key"
    return None


def validate_request(access: lease_pb2.AccessRequest) -> None:
    """INVALID_ARGUMENT (with the field) for a key or option out of bounds."""
    keys = access.ssh_public_keys
    if len(keys) > MAX_SSH_KEYS:
        raise errors.invalid(
            "TOO_MANY_SSH_KEYS", f"at most {MAX_SSH_KEYS} SSH keys", field="access.ssh_public_keys"
        )
    for i, key in enumerate(keys):
        problem = ssh_key_problem(key)
        if problem is not None:
            raise errors.invalid(
                "INVALID_SSH_KEY", f"SSH key {i}: {problem}", field=f"access.ssh_public_keys[{i}]"
            )
    opts = access.provider_options
    if len(opts) > MAX_PROVIDER_OPTIONS:
        raise errors.invalid(
            "TOO_MANY_PROVIDER_OPTIONS",
            f"at most {MAX_PROVIDER_OPTIONS} provider options",
            field="access.provider_options",
        )
    for k, v in opts.items():
        if not OPTION_KEY.fullmatch(k):
            raise errors.invalid(
                "INVALID_PROVIDER_OPTION",
                f"option names are 1..{MAX_OPTION_KEY_CHARS} characters of [a-z0-9_.-], "
                "starting with a letter",
                field="access.provider_options",
            )
        if len(v) > MAX_OPTION_VALUE_CHARS or not printable(v):
            raise errors.invalid(
                "INVALID_PROVIDER_OPTION",
                f"option {k}: at most {MAX_OPTION_VALUE_CHARS} printable characters",
                field=f"access.provider_options[{k}]",
            )


def details_problem(d: lease_pb2.AccessDetails) -> str | None:
    """Why a hook's answer is refused (the lease then fails provisioning), or None."""
    for name, value, bound in (
        ("ssh", d.ssh, MAX_SSH_CHARS),
        ("endpoint", d.endpoint, MAX_ENDPOINT_CHARS),
        ("instructions", d.instructions, MAX_INSTRUCTIONS_CHARS),
    ):
        if len(value) > bound:
            return f"{name} is longer than {bound} characters"
        if not printable(value, multiline=name == "instructions"):
            return f"{name} holds control or format characters"
    return None
