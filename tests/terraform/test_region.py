"""What modules/region must hold, read from its parsed tree."""

from __future__ import annotations

import re
from typing import Any

from tests.terraform.hcl import REGION, blocks, module, ref

M = module(REGION)
WORLD = ("0.0.0.0/0", "::/0")


def rules(kind: str) -> dict[str, dict[str, Any]]:
    return M.of_type(f"aws_vpc_security_group_{kind}_rule")


def rules_on(group: str, kind: str) -> dict[str, dict[str, Any]]:
    sg = f"aws_security_group.{group}.id"
    return {n: r for n, r in rules(kind).items() if ref(r["security_group_id"]) == sg}


def port_of(rule: dict[str, Any]) -> str:
    assert rule["from_port"] == rule["to_port"], "a rule opens one port"
    assert rule["ip_protocol"] == "tcp"
    return ref(rule["from_port"]) if isinstance(rule["from_port"], str) else str(rule["from_port"])


def default_of(var: str) -> Any:
    return M.variables[var]["default"]


def conditions(var: str) -> list[str]:
    return [v["condition"] for v in blocks(M.variables[var], "validation")]


# -- ElastiCache ---------------------------------------------------------------------------


def test_redis_is_encrypted_authenticated_and_fails_over_across_zones() -> None:
    (rg,) = M.of_type("aws_elasticache_replication_group").values()
    assert rg["transit_encryption_enabled"] is True
    assert rg["transit_encryption_mode"] == "required"
    assert rg["at_rest_encryption_enabled"] is True
    assert ref(rg["kms_key_id"]) == "aws_kms_key.this.arn"
    assert rg["automatic_failover_enabled"] is True
    assert rg["multi_az_enabled"] is True
    # A primary and at least one replica, in different zones (the subnet group spans them).
    assert ref(rg["num_cache_clusters"]) == "var.redis_replicas + 1"
    assert any(">= 1" in c for c in conditions("redis_replicas"))
    assert ref(rg["port"]) == "var.redis_port"
    assert ref(rg["security_group_ids"][0]) == "aws_security_group.redis.id"


def test_the_redis_auth_token_comes_from_a_sensitive_variable() -> None:
    (rg,) = M.of_type("aws_elasticache_replication_group").values()
    assert ref(rg["auth_token"]) == "var.redis_auth_token"
    assert ref(rg["auth_token_update_strategy"]) == "var.redis_auth_token_update_strategy"
    token = M.variables["redis_auth_token"]
    assert token["sensitive"] is True
    assert "default" not in token, "a secret has no default"
    # ElastiCache's own rule: 16-128 characters, letters, digits and !&#$^<>-.
    assert any("{16,128}" in c and "!&#$^<>-" in c for c in conditions("redis_auth_token"))
    # The nodes read it from SSM (SecureString, the region's key), never from user data.
    param = M.of_type("aws_ssm_parameter")["redis_auth_token"]
    assert param["type"] == "SecureString"
    assert ref(param["value"]) == "var.redis_auth_token"
    assert ref(param["key_id"]) == "aws_kms_key.this.arn"


def test_every_secret_is_a_sensitive_variable_kept_in_ssm() -> None:
    for var in ("redis_auth_token", "admin_token", "mesh_secret", "jwt_hs256_secret"):
        assert M.variables[var]["sensitive"] is True, var
    for name, param in M.of_type("aws_ssm_parameter").items():
        assert param["type"] == "SecureString", name
        assert ref(param["value"]).startswith("var."), name
    # No secret reaches the node's files, only SSM parameter names (a secret may be
    # compared with "" to decide whether a feature is on).
    for key in ("relay_toml", "bootstrap_settings", "user_data"):
        text = str(M.locals[key])
        for var in ("redis_auth_token", "admin_token", "mesh_secret", "jwt_hs256_secret"):
            assert not re.search(rf"var\.{var}\b(?!\s*[!=]=)", text), f"{var} in local.{key}"


def test_redis_keeps_relay_keys_and_notifies_expiries() -> None:
    (pg,) = M.of_type("aws_elasticache_parameter_group").values()
    params = {p["name"]: p["value"] for p in blocks(pg, "parameter")}
    assert "Ex" in params["notify-keyspace-events"]  # leases expire by notification
    assert params["maxmemory-policy"] == "noeviction"  # slot logs are never evicted


# -- nodes ---------------------------------------------------------------------------------


def test_the_launch_template_requires_imdsv2_and_encrypts_its_volumes() -> None:
    (lt,) = M.of_type("aws_launch_template").values()
    (md,) = blocks(lt, "metadata_options")
    assert md["http_tokens"] == "required"
    assert md["http_endpoint"] == "enabled"
    assert md["http_put_response_hop_limit"] == 1
    devices = blocks(lt, "block_device_mappings")
    assert devices
    for device in devices:
        for ebs in blocks(device, "ebs"):
            assert ebs["encrypted"] is True
    assert "key_name" not in lt, "no SSH key: Session Manager only"
    assert ref(lt["user_data"]) == "base64gzip(local.user_data)"
    assert ref(lt["vpc_security_group_ids"][0]) == "aws_security_group.nodes.id"


def test_the_nodes_run_in_the_private_subnets_behind_the_load_balancer() -> None:
    (asg,) = M.of_type("aws_autoscaling_group").values()
    assert ref(asg["vpc_zone_identifier"]) == "[for s in aws_subnet.private : s.id]"
    assert ref(asg["target_group_arns"][0]) == "aws_lb_target_group.client.arn"
    assert asg["health_check_type"] == "ELB"
    assert blocks(asg, "instance_refresh")
    for subnet in M.of_type("aws_subnet").values():
        assert subnet["map_public_ip_on_launch"] is False


def test_the_region_spans_at_least_two_zones() -> None:
    assert any("length(var.availability_zones) >= 2" in c for c in conditions("availability_zones"))
    for name in ("private", "public"):
        assert ref(M.of_type("aws_subnet")[name]["for_each"]) == "local.azs"
    (rg,) = M.of_type("aws_elasticache_replication_group").values()
    assert ref(rg["subnet_group_name"]) == "aws_elasticache_subnet_group.this.name"
    (sng,) = M.of_type("aws_elasticache_subnet_group").values()
    assert ref(sng["subnet_ids"]) == "[for s in aws_subnet.private : s.id]"


def test_the_node_role_reads_only_named_secrets() -> None:
    doc = M.data[("aws_iam_policy_document", "node_secrets")]
    for statement in blocks(doc, "statement"):
        resources = statement["resources"]
        assert resources != ["*"] and "*" not in resources, statement["sid"]
        for action in statement["actions"]:
            assert not action.endswith(":*"), action


# -- the client listener -------------------------------------------------------------------


def test_clients_reach_a_tls_listener_that_re_encrypts_to_the_nodes() -> None:
    (lb,) = M.of_type("aws_lb").values()
    assert lb["load_balancer_type"] == "network"
    assert lb["internal"] is False
    (listener,) = M.of_type("aws_lb_listener").values()
    assert listener["protocol"] == "TLS"
    assert ref(listener["certificate_arn"]) == "var.certificate_arn"
    assert default_of("tls_policy").startswith("ELBSecurityPolicy-TLS13-")
    (tg,) = M.of_type("aws_lb_target_group").values()
    assert tg["protocol"] == "TLS"
    assert ref(tg["port"]) == "var.client_port"


# -- security groups -----------------------------------------------------------------------


def test_groups_have_no_inline_rules() -> None:
    for name, sg in M.of_type("aws_security_group").items():
        assert "ingress" not in sg and "egress" not in sg, name
    assert "ingress" not in M.of_type("aws_default_security_group")["default"]


def test_the_admin_port_is_open_to_the_ops_cidrs_only() -> None:
    admin = [r for r in rules("ingress").values() if port_of(r) == "var.admin_port"]
    assert len(admin) == 1
    (rule,) = admin
    assert ref(rule["for_each"]) == "toset(var.admin_cidrs)"
    assert ref(rule["cidr_ipv4"]) == "each.value"
    assert default_of("admin_cidrs") == []
    assert any('"0.0.0.0/0"' in c and "!contains" in c for c in conditions("admin_cidrs"))


def test_no_rule_opens_a_node_or_redis_port_to_the_world() -> None:
    for kind in ("ingress", "egress"):
        for name, rule in rules(kind).items():
            cidr = rule.get("cidr_ipv4", "")
            if cidr in WORLD:
                # The only world-wide rule: nodes out to HTTPS (packages, SSM, KMS).
                assert (kind, name, port_of(rule)) == ("egress", "nodes_https", "443")
    for name, rule in rules("ingress").items():
        assert "cidr_ipv6" not in rule, name


def test_the_mesh_port_is_open_only_within_the_vpc() -> None:
    mesh = [r for r in rules("ingress").values() if port_of(r) == "var.mesh_port"]
    assert mesh
    for rule in mesh:
        # The region's own nodes: the nodes' group referencing itself.
        assert ref(rule["security_group_id"]) == "aws_security_group.nodes.id"
        assert ref(rule["referenced_security_group_id"]) == "aws_security_group.nodes.id"
        assert "cidr_ipv4" not in rule


def test_the_client_port_is_reached_through_the_load_balancer() -> None:
    (client,) = [
        r for r in rules_on("nodes", "ingress").values() if port_of(r) == "var.client_port"
    ]
    assert ref(client["referenced_security_group_id"]) == "aws_security_group.lb.id"
    (world,) = rules_on("lb", "ingress").values()
    assert port_of(world) == "var.listener_port"
    assert ref(world["for_each"]) == "toset(var.client_cidrs)"
    assert default_of("client_cidrs") == ["0.0.0.0/0"]


def test_redis_is_reached_on_its_tls_port_from_the_nodes_only() -> None:
    (rule,) = rules_on("redis", "ingress").values()
    assert port_of(rule) == "var.redis_port"
    assert ref(rule["referenced_security_group_id"]) == "aws_security_group.nodes.id"
    assert not rules_on("redis", "egress")


def test_the_node_ports_default_to_relays_and_differ() -> None:
    assert (default_of("client_port"), default_of("admin_port"), default_of("mesh_port")) == (
        7400,
        7401,
        7402,
    )
    assert default_of("redis_port") == 6379
    (lt,) = M.of_type("aws_launch_template").values()
    preconditions = [p["condition"] for p in blocks(lt["lifecycle"][0], "precondition")]
    assert any(
        "distinct([var.client_port, var.admin_port, var.mesh_port])" in c for c in preconditions
    )
    assert any("jwt_hs256_secret" in c and "jwt_es256_public_key_pem" in c for c in preconditions)


def test_the_vpc_logs_its_flows_and_its_default_group_denies() -> None:
    (flow,) = M.of_type("aws_flow_log").values()
    assert flow["traffic_type"] == "ALL"
    for name, group in M.of_type("aws_cloudwatch_log_group").items():
        assert ref(group["kms_key_id"]) == "aws_kms_key.this.arn", name
    (key,) = M.of_type("aws_kms_key").values()
    assert key["enable_key_rotation"] is True


def test_the_relay_region_name_follows_the_node_id_rule() -> None:
    """A node id's region part, narrowed to what AWS names made from it accept."""
    (cond,) = conditions("name")
    pattern = re.search(r'regex\("([^"]+)", var\.name\)', cond)
    assert pattern and '!can(regex("--", var.name))' in cond
    regex = pattern.group(1).replace("\\\\", "\\")

    def accepted(name: str) -> bool:
        return bool(re.fullmatch(regex, name)) and "--" not in name

    for good in ("sg", "fra", "us-east", "a1", "a" * 16):
        assert accepted(good), good
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", good)  # relay's node-id rule
    for bad in ("", "-x", "x-", "a--b", "Fra", "x/y", "a" * 17):
        assert not accepted(bad), bad
