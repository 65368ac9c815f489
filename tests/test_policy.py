"""Client, port, destination and self-loop rules."""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from ipaddress import ip_address, ip_network

import pytest

from splicegate import errors
from splicegate.policy import (
    Listener,
    Policy,
    broadcast_addresses,
    parse_deny_domain_rule,
    parse_domain_rule,
    parse_network,
    parse_port_spec,
)

DENIED_BY_DEFAULT = [
    "0.0.0.0", "10.1.2.3", "100.64.0.1", "127.0.0.1", "127.255.255.254", "169.254.169.254",
    "172.16.0.1", "172.31.255.255", "192.0.0.8", "192.0.2.1", "192.168.1.1", "198.18.0.1",
    "198.51.100.7", "203.0.113.9", "224.0.0.251", "239.1.1.1", "240.0.0.1",
    "255.255.255.255", "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
    "2001:db8::1", "3fff::1", "100::1", "fec0::1", "::a00:1", "64:ff9b:1::a",
    # IPv4 embedded in IPv6: mapped, NAT64 well-known prefix, 6to4
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "64:ff9b::c0a8:101", "2002:7f00:1::", "2002:a00:1:5::1",
    "2002:c0a8:101::1",
]  # fmt: skip
ALLOWED_BY_DEFAULT = [
    "8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "192.169.0.1", "2606:4700::1111",
    "2a00:1450:4001::1", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
]  # fmt: skip


@pytest.mark.parametrize("addr", DENIED_BY_DEFAULT)
def test_special_ranges_denied_by_default(addr: str) -> None:
    with pytest.raises(errors.DestinationDenied) as info:
        Policy().allowed_destinations("target.example", [ip_address(addr)])
    assert info.value.status == 403
    assert "--allow-dest" in info.value.message


@pytest.mark.parametrize("addr", ALLOWED_BY_DEFAULT)
def test_public_addresses_allowed(addr: str) -> None:
    assert Policy().allowed_destinations("t", [ip_address(addr)]) == [ip_address(addr)]


def test_longest_prefix_wins_and_deny_wins_a_tie() -> None:
    policy = Policy(
        allow_dest=[ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32"),
                    ip_network("8.8.8.0/24")],
        deny_dest=[ip_network("10.1.0.0/16"), ip_network("8.8.8.0/24")],
    )  # fmt: skip
    ok = policy.allowed_destinations
    assert ok("t", [ip_address("10.2.0.1")])
    assert ok("t", [ip_address("127.0.0.1")])
    assert ok("t", [ip_address("::ffff:127.0.0.1")])  # the rule applies to the embedded form
    for denied in ("10.1.0.1", "127.0.0.2", "8.8.8.8", "64:ff9b::a01:1"):
        with pytest.raises(errors.DestinationDenied):
            ok("t", [ip_address(denied)])


def test_operator_allow_overrides_default_for_the_same_prefix() -> None:
    policy = Policy(allow_dest=[ip_network("127.0.0.0/8")])
    assert policy.allowed_destinations("t", [ip_address("127.0.0.1")])


def test_only_allowed_addresses_are_returned() -> None:
    policy = Policy()
    addrs = [ip_address("10.0.0.1"), ip_address("8.8.8.8"), ip_address("::1")]
    assert policy.allowed_destinations("rebind.example", addrs) == [ip_address("8.8.8.8")]


def test_denial_names_the_rule() -> None:
    with pytest.raises(errors.DestinationDenied) as info:
        Policy().allowed_destinations("metadata.example", [ip_address("169.254.169.254")])
    assert "169.254.0.0/16" in info.value.message
    assert "metadata.example (169.254.169.254)" in info.value.message
    assert info.value.details == "169.254.169.254 is in 169.254.0.0/16"


def test_clients_default_to_localnet() -> None:
    policy = Policy()
    for ok in ("127.0.0.1", "10.9.9.9", "192.168.0.2", "::1", "fd00::1", "::ffff:127.0.0.1"):
        policy.check_client(ip_address(ok))
    with pytest.raises(errors.ClientDenied) as info:
        policy.check_client(ip_address("8.8.8.8"))
    assert "--allow-client 8.8.8.8/32" in info.value.message


def test_allow_client_replaces_default() -> None:
    policy = Policy(allow_client=[ip_network("203.0.113.0/24")])
    policy.check_client(ip_address("203.0.113.5"))
    with pytest.raises(errors.ClientDenied):
        policy.check_client(ip_address("127.0.0.1"))


def test_ports() -> None:
    assert parse_port_spec("443").low == 443
    assert (parse_port_spec("8000-8100").low, parse_port_spec("8000-8100").high) == (8000, 8100)
    assert str(parse_port_spec("ANY")) == "any"
    for bad in ("0", "65536", "9-1", "x", "", "1-2-3"):
        with pytest.raises(ValueError):
            parse_port_spec(bad)
    policy = Policy()
    policy.check_port(443)
    with pytest.raises(errors.PortDenied) as info:
        policy.check_port(25)
    assert info.value.message == "port 25 is not allowed; allow it with --allow-port 25"
    ranged = Policy(allow_port=[parse_port_spec("8000-8100")])
    ranged.check_port(8050)
    with pytest.raises(errors.PortDenied):
        ranged.check_port(443)


def test_parse_network_rejects_host_bits() -> None:
    assert parse_network("10.0.0.0/8") == ip_network("10.0.0.0/8")
    with pytest.raises(ValueError):
        parse_network("10.0.0.1/8")


def test_self_loop() -> None:
    policy = Policy(listeners=[Listener(ip_address("127.0.0.1"), 3128),
                               Listener(ip_address("::"), 8080)])  # fmt: skip
    with pytest.raises(errors.ProxyLoop):
        policy.check_not_self(ip_address("127.0.0.1"), 3128)
    with pytest.raises(errors.ProxyLoop):
        policy.check_not_self(ip_address("::ffff:127.0.0.1"), 3128)
    with pytest.raises(errors.ProxyLoop):  # a wildcard listener is every local address
        policy.check_not_self(ip_address("127.0.0.7"), 8080)
    policy.check_not_self(ip_address("127.0.0.1"), 3129)
    policy.check_not_self(ip_address("127.0.0.2"), 3128)
    policy.check_not_self(ip_address("192.0.2.1"), 8080)  # not an address of this host
    # NAT64 and 6to4 addresses go out through a gateway: never this proxy's listener
    policy.check_not_self(ip_address("64:ff9b::7f00:1"), 3128)
    policy.check_not_self(ip_address("2002:7f00:1::"), 3128)
    with pytest.raises(errors.ProxyLoop, match=r"\[::1\]:8080 is this proxy"):
        policy.check_not_self(ip_address("::1"), 8080)


def test_an_unspecified_target_is_every_listener_of_its_family() -> None:
    """Connecting to 0.0.0.0 or :: reaches this host (Linux sends it to loopback), so it
    is a loop on any listener of its family and port, wherever that listener is bound; an
    IPv4-mapped target is judged as IPv4. Reachable only once --allow-dest lets 0.0.0.0/8
    or ::/128 through, which must not open a way back into the proxy."""
    policy = Policy(listeners=[Listener(ip_address("127.0.0.1"), 3128),
                               Listener(ip_address("::1"), 8080),
                               Listener(ip_address("192.0.2.7"), 9090)])  # fmt: skip
    for target, port in [("0.0.0.0", 3128), ("::ffff:0.0.0.0", 3128), ("::", 8080),
                         ("0.0.0.0", 9090)]:  # fmt: skip
        with pytest.raises(errors.ProxyLoop, match=rf"{port} is this proxy itself"):
            policy.check_not_self(ip_address(target), port)
    policy.check_not_self(ip_address("0.0.0.0"), 3129)  # no listener on that port
    policy.check_not_self(ip_address("0.0.0.0"), 8080)  # an IPv6 listener only
    policy.check_not_self(ip_address("::"), 3128)  # an IPv4 listener only


def test_an_ipv4_wildcard_listener_is_not_reached_over_ipv6() -> None:
    policy = Policy(listeners=[Listener(ip_address("0.0.0.0"), 8080)])
    policy.check_not_self(ip_address("::1"), 8080)
    for reached in ("127.0.0.1", "::ffff:127.0.0.1"):
        with pytest.raises(errors.ProxyLoop):
            policy.check_not_self(ip_address(reached), 8080)


@pytest.mark.parametrize(
    "target", ["ff02::1", "fe80::1", "224.0.0.1", "::ffff:224.0.0.1", "255.255.255.255"]
)
def test_addresses_that_bind_oddly_are_never_the_proxy_itself(target: str) -> None:
    """A wildcard listener makes the loop check bind a probe to the target: multicast and
    broadcast addresses bind on Linux, a link-local IPv6 one fails with EINVAL. None can
    reach a listener, so none is a loop, and none may end in an internal error."""
    policy = Policy(
        listeners=[Listener(ip_address("::"), 8080), Listener(ip_address("0.0.0.0"), 8080)]
    )
    policy.check_not_self(ip_address(target), 8080)  # no ProxyLoop, no OSError
    with pytest.raises(errors.DestinationDenied):  # the destination table refuses them
        policy.destinations("x.test", 8080, [ip_address(target)])


def test_a_subnet_broadcast_address_is_never_the_proxy_itself() -> None:
    """It binds like one of the host's addresses (a wildcard listener makes the loop check
    try), yet nothing connects to it: not a loop."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        broadcasts = broadcast_addresses(probe)
    if not broadcasts:
        pytest.skip("no interface here has an IPv4 broadcast address")
    policy = Policy(listeners=[Listener(ip_address("0.0.0.0"), 8080)])
    for address in broadcasts:
        policy.check_not_self(address, 8080)  # no ProxyLoop
    policy.check_not_self(ip_address("127.0.0.1"), 3128)  # another port: no loop either
    with pytest.raises(errors.ProxyLoop):  # while the host's own addresses still are
        policy.check_not_self(ip_address("127.0.0.1"), 8080)


def test_rules_written_ipv4_mapped_judge_the_ipv4_addresses() -> None:
    """Addresses are judged by the IPv4 address they embed: a rule in the mapped form is
    that IPv4 rule, or it would never match anything."""
    policy = Policy(
        allow_client=[ip_network("::ffff:127.0.0.1/128")],
        allow_dest=[ip_network("::ffff:127.0.0.0/104")],
        deny_dest=[ip_network("::ffff:192.0.2.0/120")],
    )
    policy.check_client(ip_address("127.0.0.1"))
    policy.check_client(ip_address("::ffff:127.0.0.1"))
    with pytest.raises(errors.ClientDenied):
        policy.check_client(ip_address("127.0.0.2"))
    assert policy.allowed_destinations("x", [ip_address("127.0.0.5")]) == [ip_address("127.0.0.5")]
    with pytest.raises(errors.DestinationDenied, match="--deny-dest"):
        policy.allowed_destinations("x", [ip_address("192.0.2.7")])


# --- domain rules (--allow-domain, --deny-domain) -------------------------------------------


def domains(allow: Sequence[str] = (), deny: Sequence[str] = ()) -> Policy:
    return Policy(
        allow_domain=[parse_domain_rule(r) for r in allow],
        deny_domain=[parse_deny_domain_rule(r) for r in deny],
    )


def allowed(policy: Policy, host: str) -> bool:
    literal = host.replace(".", "").isdigit() or ":" in host
    try:
        policy.check_domain(host, literal)
    except errors.DomainDenied as err:
        assert err.status == 403 and err.proxy_status_error == "http_request_denied"
        return False
    return True


def test_domain_rule_syntax() -> None:
    assert str(parse_domain_rule("Example.COM.")) == "example.com"
    assert str(parse_domain_rule(" .example.com ")) == ".example.com"
    assert parse_domain_rule(".example.com").subdomains
    assert str(parse_domain_rule("[2001:DB8::1]")) == "2001:db8::1"
    assert str(parse_domain_rule("192.0.2.10")) == "192.0.2.10"
    for bad in ("", ".", "..example.com", "exa mple.com", "-a.com", "*.example.com",
                "ex\u00e4mple.com", "a" * 64 + ".com", "http://example.com", "1.2.3",
                ".192.0.2.10"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_domain_rule(bad)


def test_exact_and_subdomain_rules() -> None:
    policy = domains(allow=["example.com", ".example.org"])
    assert allowed(policy, "example.com")
    assert not allowed(policy, "www.example.com")  # exact means exact
    assert not allowed(policy, "badexample.com")
    assert allowed(policy, "example.org") and allowed(policy, "a.b.example.org")
    assert not allowed(policy, "example.org.evil.test")
    assert not allowed(policy, "xexample.org")
    assert not allowed(policy, "other.test")


def test_no_rules_allow_everything() -> None:
    policy = domains()
    assert allowed(policy, "anything.test") and allowed(policy, "192.0.2.1")


def test_deny_wins_and_names_its_rule() -> None:
    policy = domains(allow=[".example.com"], deny=[".ads.example.com", "evil.example.com"])
    assert allowed(policy, "www.example.com")
    assert not allowed(policy, "evil.example.com")
    assert allowed(policy, "www.evil.example.com")  # the deny rule was exact
    assert not allowed(policy, "x.ads.example.com")
    with pytest.raises(errors.DomainDenied) as info:
        policy.check_domain("x.ads.example.com", False)
    assert "--deny-domain .ads.example.com" in info.value.message
    with pytest.raises(errors.DomainDenied) as info:
        policy.check_domain("other.test", False)
    assert "not in the allowed domains (.example.com)" in info.value.message
    assert "--allow-domain other.test" in info.value.message


def test_deny_only_lists_allow_the_rest() -> None:
    policy = domains(deny=[".tracker.test"])
    assert allowed(policy, "fine.test") and not allowed(policy, "tracker.test")


def test_ip_literals_and_domain_rules() -> None:
    """Deny rules never match a literal; an allow list denies literals it does not name."""
    assert allowed(domains(deny=[".example.com"]), "192.0.2.1")
    policy = domains(allow=[".example.com", "192.0.2.10", "2001:db8::1"])
    assert not allowed(policy, "192.0.2.1")
    assert allowed(policy, "192.0.2.10")
    assert allowed(policy, "2001:db8::1") and allowed(policy, "2001:0db8:0::1")
    assert not allowed(policy, "2001:db8::2")
    with pytest.raises(errors.DomainDenied, match=r"the address 192\.0\.2\.1 is not in"):
        policy.check_domain("192.0.2.1", True)
    # An address is no deny rule: as one it would judge only the spelling written, and
    # [::ffff:192.0.2.10] would get past it. --deny-dest judges every form.
    for address, dest in (("192.0.2.10", "192.0.2.10/32"), ("[2001:DB8::1]", "2001:db8::1/128")):
        with pytest.raises(ValueError, match=rf"deny it with --deny-dest {re.escape(dest)},"):
            parse_deny_domain_rule(address)
    assert str(parse_deny_domain_rule(".example.com")) == ".example.com"


def test_many_rules_match_by_suffix() -> None:
    policy = domains(allow=[f".d{i}.test" for i in range(5000)])
    assert allowed(policy, "a.b.d4999.test") and not allowed(policy, "a.b.d5000.test")
