"""The root module and the two-region example: regions, providers, peering, CIDRs."""

from __future__ import annotations

import ipaddress
import itertools
import re
from typing import Any

import pytest

from tests.terraform.hcl import (
    EXAMPLE,
    INTERREGION,
    REGION,
    TERRAFORM,
    Module,
    blocks,
    module,
    ref,
)

DEPLOYMENTS = [module(TERRAFORM), module(EXAMPLE)]
IDS = ["root", "two_region"]


def region_modules(m: Module) -> dict[str, dict[str, Any]]:
    return {n: b for n, b in m.modules.items() if b["source"].endswith("modules/region")}


def pair_modules(m: Module) -> dict[str, dict[str, Any]]:
    return {n: b for n, b in m.modules.items() if b["source"].endswith("modules/interregion")}


def default_regions(m: Module) -> dict[str, dict[str, Any]]:
    regions: dict[str, dict[str, Any]] = m.variables["regions"]["default"]
    return regions


def provider_aliases(m: Module) -> dict[str, dict[str, Any]]:
    return {body["alias"]: body for name, body in m.providers if name == "aws"}


def test_three_regions_by_default() -> None:
    root = module(TERRAFORM)
    assert sorted(default_regions(root)) == ["fra", "iad", "sg"]
    assert sorted(root.locals["declared_regions"]) == ["fra", "iad", "sg"]
    assert sorted(default_regions(module(EXAMPLE))) == ["fra", "iad"]


@pytest.mark.parametrize("m", DEPLOYMENTS, ids=IDS)
def test_each_region_module_gets_its_own_aliased_provider(m: Module) -> None:
    aliases = provider_aliases(m)
    regions = region_modules(m)
    assert sorted(aliases) == sorted(regions) == sorted(default_regions(m))
    for name, provider in aliases.items():
        assert ref(provider["region"]) == f'var.regions["{name}"].aws_region'
    for name, body in regions.items():
        assert body["providers"] == {"aws": f"${{aws.{name}}}"}, name
        assert body["name"] == name
        assert ref(body["vpc_cidr"]) == f'var.regions["{name}"].vpc_cidr'
        assert ref(body["availability_zones"]) == f'var.regions["{name}"].availability_zones'
        assert ref(body["certificate_arn"]) == f'var.certificate_arns["{name}"]'
        assert ref(body["redis_auth_token"]) == f'var.redis_auth_tokens["{name}"]'
    # No unaliased aws provider that a resource could fall back to.
    assert all("alias" in body for name, body in m.providers if name == "aws")
    default_aws_regions = [r["aws_region"] for r in default_regions(m).values()]
    assert len(set(default_aws_regions)) == len(default_aws_regions)


@pytest.mark.parametrize("m", DEPLOYMENTS, ids=IDS)
def test_every_region_peers_with_every_other(m: Module) -> None:
    regions = region_modules(m)
    for name, body in regions.items():
        peers = sorted(ref(p) for p in body["peers"])
        assert peers == sorted(f"module.{o}.peer" for o in regions if o != name), name


@pytest.mark.parametrize("m", DEPLOYMENTS, ids=IDS)
def test_every_pair_of_regions_is_joined_once_with_both_providers(m: Module) -> None:
    regions = region_modules(m)
    joined = set()
    for name, body in pair_modules(m).items():
        a = re.fullmatch(r"module\.(\w+)\.network", ref(body["requester"]))
        b = re.fullmatch(r"module\.(\w+)\.network", ref(body["accepter"]))
        assert a and b, name
        req, acc = a.group(1), b.group(1)
        providers = {ref(k): ref(v) for k, v in body["providers"].items()}
        assert providers == {"aws.requester": f"aws.{req}", "aws.accepter": f"aws.{acc}"}, name
        assert frozenset((req, acc)) not in joined, f"{req}-{acc} twice"
        joined.add(frozenset((req, acc)))
    assert joined == {frozenset(p) for p in itertools.combinations(regions, 2)}


# -- CIDRs -------------------------------------------------------------------------------


def overlap_by_validation(a: str, b: str) -> bool:
    """The validation's test, in Python: the network addresses agree when both CIDRs are
    cut to the shorter prefix (cidrhost("<addr>/<len>", 0) is that network address)."""
    na, nb = ipaddress.ip_network(a), ipaddress.ip_network(b)
    n = min(na.prefixlen, nb.prefixlen)
    return bool(
        ipaddress.ip_network(f"{na.network_address}/{n}", strict=False).network_address
        == ipaddress.ip_network(f"{nb.network_address}/{n}", strict=False).network_address
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("10.20.0.0/16", "10.30.0.0/16"),
        ("10.0.0.0/8", "10.30.0.0/16"),
        ("10.30.0.0/16", "10.30.128.0/17"),
        ("10.30.0.0/16", "10.31.0.0/16"),
        ("192.168.0.0/22", "192.168.4.0/22"),
        ("172.16.0.0/12", "172.32.0.0/16"),
        ("10.30.0.0/20", "10.30.0.0/20"),
    ],
)
def test_the_overlap_rule_is_exactly_network_overlap(a: str, b: str) -> None:
    expected = ipaddress.ip_network(a).overlaps(ipaddress.ip_network(b))
    assert overlap_by_validation(a, b) == overlap_by_validation(b, a) == expected


@pytest.mark.parametrize("m", DEPLOYMENTS, ids=IDS)
def test_region_cidrs_cannot_overlap(m: Module) -> None:
    conditions = [v["condition"] for v in blocks(m.variables["regions"], "validation")]
    (overlap,) = [c for c in conditions if "cidrhost(format(" in c]
    # Every pair of regions, cut to the shorter prefix, compared.
    for piece in (
        "for a, ra in var.regions",
        "for b, rb in var.regions",
        "a == b ||",
        'cidrhost(format("%s/%d", cidrhost(ra.vpc_cidr, 0), min(',
        'cidrhost(format("%s/%d", cidrhost(rb.vpc_cidr, 0), min(',
        "!=",
    ):
        assert piece in overlap, piece
    cidrs = [r["vpc_cidr"] for r in default_regions(m).values()]
    for a, b in itertools.combinations(cidrs, 2):
        assert not ipaddress.ip_network(a).overlaps(ipaddress.ip_network(b)), (a, b)
        assert not overlap_by_validation(a, b)
    for cidr in cidrs:
        assert ipaddress.ip_network(cidr).is_private


def test_the_root_names_regions_by_the_modules_rule() -> None:
    (module_rule,) = [
        v["condition"] for v in blocks(module(REGION).variables["name"], "validation")
    ]
    root_rules = [
        v["condition"] for v in blocks(module(TERRAFORM).variables["regions"], "validation")
    ]
    pattern = re.search(r'regex\("([^"]+)", var\.name\)', module_rule)
    assert pattern
    assert any(f'regex("{pattern.group(1)}", name)' in rule for rule in root_rules)
    assert any('!can(regex("--", name))' in rule for rule in root_rules)


@pytest.mark.parametrize("m", DEPLOYMENTS, ids=IDS)
def test_default_zones_belong_to_their_region(m: Module) -> None:
    for name, r in default_regions(m).items():
        zones = r["availability_zones"]
        assert len(zones) >= 2 and len(set(zones)) == len(zones), name
        for zone in zones:
            assert re.fullmatch(re.escape(r["aws_region"]) + "[a-z]", zone), zone


@pytest.mark.parametrize("m", DEPLOYMENTS, ids=IDS)
def test_deployment_secrets_are_sensitive_and_have_no_default(m: Module) -> None:
    for var in ("redis_auth_tokens", "mesh_secrets", "admin_token", "jwt_hs256_secret"):
        assert m.variables[var]["sensitive"] is True, var
    for var in ("redis_auth_tokens", "mesh_secrets", "admin_token"):
        assert "default" not in m.variables[var], var


@pytest.mark.parametrize("m", DEPLOYMENTS, ids=IDS)
def test_outputs_name_each_regions_client_and_redis_endpoint(m: Module) -> None:
    regions = sorted(region_modules(m))
    for output, attr in (("client_endpoints", "client_url"), ("redis_endpoints", "redis_endpoint")):
        value = m.outputs[output]["value"]
        assert sorted(value) == regions
        for name in regions:
            assert ref(value[name]) == f"module.{name}.{attr}"


def test_the_root_refuses_regions_it_has_no_blocks_for() -> None:
    output = module(TERRAFORM).outputs["client_endpoints"]
    (pre,) = blocks(output, "precondition")
    assert ref(pre["condition"]) == "sort(keys(var.regions)) == sort(local.declared_regions)"


# -- modules/interregion -------------------------------------------------------------------


def test_interregion_opens_only_the_redis_tls_port() -> None:
    m = module(INTERREGION)
    kinds = {t for t, _ in m.resources}
    assert kinds == {
        "aws_vpc_peering_connection",
        "aws_vpc_peering_connection_accepter",
        "aws_route",
        "aws_vpc_security_group_ingress_rule",
        "aws_vpc_security_group_egress_rule",
    }
    sg_rules = {
        **m.of_type("aws_vpc_security_group_ingress_rule"),
        **m.of_type("aws_vpc_security_group_egress_rule"),
    }
    assert len(sg_rules) == 4  # each way: in on the Redis group, out of the nodes' group
    for name, rule in sg_rules.items():
        assert rule["ip_protocol"] == "tcp", name
        assert rule["from_port"] == rule["to_port"], name
        assert re.fullmatch(r"var\.(requester|accepter)\.redis_port", ref(rule["from_port"])), name
        side = ref(rule["from_port"]).split(".")[1]  # whose Redis
        other = "accepter" if side == "requester" else "requester"
        if name in m.of_type("aws_vpc_security_group_ingress_rule"):
            assert ref(rule["security_group_id"]) == f"var.{side}.redis_security_group_id"
            assert ref(rule["for_each"]) == f"var.{other}.private_subnet_cidrs"
        else:
            assert ref(rule["security_group_id"]) == f"var.{other}.node_security_group_id"
            assert ref(rule["for_each"]) == f"var.{side}.private_subnet_cidrs"
        assert ref(rule["cidr_ipv4"]) == "each.value"


def test_interregion_runs_each_side_on_its_own_provider() -> None:
    m = module(INTERREGION)
    (block,) = m.terraform
    (providers,) = block["required_providers"]
    aliases = [ref(a) for a in providers["aws"]["configuration_aliases"]]
    assert aliases == ["aws.requester", "aws.accepter"]
    for (rtype, name), body in m.resources.items():
        assert ref(body["provider"]) in aliases, f"{rtype}.{name}"
    peering = m.of_type("aws_vpc_peering_connection")["this"]
    assert ref(peering["peer_region"]) == "var.accepter.aws_region"
    assert ref(peering["provider"]) == "aws.requester"
    accepter = m.of_type("aws_vpc_peering_connection_accepter")["this"]
    assert ref(accepter["provider"]) == "aws.accepter"
    assert accepter["auto_accept"] is True


def test_interregion_routes_only_to_the_peers_private_subnets() -> None:
    m = module(INTERREGION)
    routes = m.of_type("aws_route")
    assert len(routes) == 2
    for name, route in routes.items():
        assert ref(route["destination_cidr_block"]) == "each.value.cidr", name
        assert ref(route["vpc_peering_connection_id"]) == (
            "aws_vpc_peering_connection_accepter.this.id"
        )
    assert "var.accepter.private_subnet_cidrs" in m.locals["requester_routes"]
    assert "var.requester.private_subnet_cidrs" in m.locals["accepter_routes"]
