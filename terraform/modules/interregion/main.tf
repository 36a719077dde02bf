# Two relay regions joined: a cross-region VPC peering, routes between their private
# subnets, and security-group rules that let each region's nodes reach the other
# region's Redis on its TLS port. Nothing else crosses: links (cluster.peers) only ever
# write into the other region's Redis. Security groups cannot reference each other
# across regions, so the rules name the peer's private subnet CIDRs.

locals {
  name = "relay-${var.requester.name}-${var.accepter.name}"
  tags = merge(var.tags, { "relay:link" = "${var.requester.name}-${var.accepter.name}" })

  # Every (route table, peer subnet) pair, keyed "az0/az1": keys known at plan time.
  requester_routes = {
    for pair in setproduct(keys(var.requester.private_route_table_ids), keys(var.accepter.private_subnet_cidrs)) :
    "${pair[0]}/${pair[1]}" => {
      route_table_id = var.requester.private_route_table_ids[pair[0]]
      cidr           = var.accepter.private_subnet_cidrs[pair[1]]
    }
  }
  accepter_routes = {
    for pair in setproduct(keys(var.accepter.private_route_table_ids), keys(var.requester.private_subnet_cidrs)) :
    "${pair[0]}/${pair[1]}" => {
      route_table_id = var.accepter.private_route_table_ids[pair[0]]
      cidr           = var.requester.private_subnet_cidrs[pair[1]]
    }
  }
}

resource "aws_vpc_peering_connection" "this" {
  provider    = aws.requester
  vpc_id      = var.requester.vpc_id
  peer_vpc_id = var.accepter.vpc_id
  peer_region = var.accepter.aws_region
  auto_accept = false # cross-region: the accepter side accepts below
  tags        = merge(local.tags, { Name = local.name, Side = "requester" })

  lifecycle {
    precondition {
      condition     = var.requester.name != var.accepter.name
      error_message = "A region cannot be peered with itself."
    }
  }
}

resource "aws_vpc_peering_connection_accepter" "this" {
  provider                  = aws.accepter
  vpc_peering_connection_id = aws_vpc_peering_connection.this.id
  auto_accept               = true
  tags                      = merge(local.tags, { Name = local.name, Side = "accepter" })
}

# -- routes: private subnets to the peer's private subnets ---------------------------

resource "aws_route" "requester_to_accepter" {
  provider                  = aws.requester
  for_each                  = local.requester_routes
  route_table_id            = each.value.route_table_id
  destination_cidr_block    = each.value.cidr
  vpc_peering_connection_id = aws_vpc_peering_connection_accepter.this.id
}

resource "aws_route" "accepter_to_requester" {
  provider                  = aws.accepter
  for_each                  = local.accepter_routes
  route_table_id            = each.value.route_table_id
  destination_cidr_block    = each.value.cidr
  vpc_peering_connection_id = aws_vpc_peering_connection_accepter.this.id
}

# -- the Redis TLS port, each way; nothing else ---------------------------------------

resource "aws_vpc_security_group_ingress_rule" "accepter_redis_from_requester_nodes" {
  provider          = aws.accepter
  for_each          = var.requester.private_subnet_cidrs
  security_group_id = var.accepter.redis_security_group_id
  description       = "Redis TLS port, from ${var.requester.name}'s nodes (links)"
  ip_protocol       = "tcp"
  from_port         = var.accepter.redis_port
  to_port           = var.accepter.redis_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "requester_nodes_to_accepter_redis" {
  provider          = aws.requester
  for_each          = var.accepter.private_subnet_cidrs
  security_group_id = var.requester.node_security_group_id
  description       = "Redis TLS port of ${var.accepter.name} (links)"
  ip_protocol       = "tcp"
  from_port         = var.accepter.redis_port
  to_port           = var.accepter.redis_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "requester_redis_from_accepter_nodes" {
  provider          = aws.requester
  for_each          = var.accepter.private_subnet_cidrs
  security_group_id = var.requester.redis_security_group_id
  description       = "Redis TLS port, from ${var.accepter.name}'s nodes (links)"
  ip_protocol       = "tcp"
  from_port         = var.requester.redis_port
  to_port           = var.requester.redis_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "accepter_nodes_to_requester_redis" {
  provider          = aws.accepter
  for_each          = var.requester.private_subnet_cidrs
  security_group_id = var.accepter.node_security_group_id
  description       = "Redis TLS port of ${var.requester.name} (links)"
  ip_protocol       = "tcp"
  from_port         = var.requester.redis_port
  to_port           = var.requester.redis_port
  cidr_ipv4         = each.value
}
