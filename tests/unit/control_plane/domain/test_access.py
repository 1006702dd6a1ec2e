"""SSH public keys and provider options are checked before a lease is granted; a hook's access
details are bounded."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from control_plane.domain import access
from control_plane.domain.errors import DomainError
from gpufed.v1 import lease_pb2

# Public keys made with ssh-keygen for these tests (no private key is kept anywhere).
KEYS = Path(__file__).parents[3] / "data" / "ssh_keys"
ED25519, RSA_3072, RSA_2048, ECDSA_384 = (
    (KEYS / f"{n}.pub").read_text(encoding="utf-8").strip()
    for n in ("ed25519", "rsa3072", "rsa2048", "ecdsa384")
)


@pytest.mark.parametrize("key", [ED25519, RSA_3072, ECDSA_384, ED25519.rsplit(" ", 1)[0]])
def test_strong_keys_of_each_type_pass_with_or_without_a_comment(key: str) -> None:
    assert access.ssh_key_problem(key) is None


def _with_blob(kind: str, blob: bytes) -> str:
    return f"{kind} {base64.b64encode(blob).decode()}"


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (RSA_2048, "at least 3072 bits"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "key type"),
        ("ssh-ed25519", "not an OpenSSH public key line"),
        ("ssh-ed25519 not-base64!", "does not decode"),
        (ED25519.replace("ssh-ed25519", "ssh-rsa", 1), "another type"),
        (_with_blob("ssh-ed25519", _s(b"ssh-ed25519") + _s(b"short")), "32 bytes"),
        (_with_blob("ssh-ed25519", _s(b"ssh-ed25519") + _s(bytes(32)) + b"x"), "trailing bytes"),
        (_with_blob("ssh-ed25519", _s(b"ssh-ed25519") + b"\x00\x00\xff\xff"), "does not decode"),
        (ECDSA_384.replace("nistp384", "nistp256", 1), "another type"),
        (ED25519 + "\nssh-ed25519 AAAA", "one line"),
        ("ssh-ed25519 " + "A" * 5000, "longer than"),
    ],
)
def test_weak_malformed_or_smuggled_keys_are_refused_with_the_reason(key: str, why: str) -> None:
    problem = access.ssh_key_problem(key)
    assert problem is not None and why in problem


def test_an_access_request_is_bounded_in_keys_and_options() -> None:
    ok = lease_pb2.AccessRequest(ssh_public_keys=[ED25519], provider_options={"image": "pytorch:24.10"})
    access.validate_request(ok)
    cases = [
        (lease_pb2.AccessRequest(ssh_public_keys=[ED25519] * 9), "TOO_MANY_SSH_KEYS"),
        (lease_pb2.AccessRequest(ssh_public_keys=[ED25519, RSA_2048]), "INVALID_SSH_KEY"),
        (
            lease_pb2.AccessRequest(provider_options={f"k{i}": "v" for i in range(17)}),
            "TOO_MANY_PROVIDER_OPTIONS",
        ),
        (lease_pb2.AccessRequest(provider_options={"Image": "x"}), "INVALID_PROVIDER_OPTION"),
        (lease_pb2.AccessRequest(provider_options={"image": "x" * 257}), "INVALID_PROVIDER_OPTION"),
        (lease_pb2.AccessRequest(provider_options={"image": "a\nb"}), "INVALID_PROVIDER_OPTION"),
    ]
    for request, reason in cases:
        with pytest.raises(DomainError) as e:
            access.validate_request(request)
        assert e.value.reason == reason
        assert e.value.field.startswith("access.")


def test_a_hooks_answer_is_bounded_and_one_line_where_it_must_be() -> None:
    assert access.details_problem(lease_pb2.AccessDetails(ssh="ssh u@h", instructions="a\nb")) is None
    assert "longer" in (access.details_problem(lease_pb2.AccessDetails(ssh="x" * 513)) or "")
    assert "control" in (access.details_problem(lease_pb2.AccessDetails(ssh="ssh u@h\nrm -rf /")) or "")
