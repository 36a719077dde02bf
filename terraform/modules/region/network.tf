# The region's network: a VPC with a public and a private subnet in each of the
# availability_zones. The nodes and Redis live in the private subnets (outbound through
# one NAT gateway per zone); only the load balancer is in the public ones.

# The pinned zones, checked to exist and be available in this region.
data "aws_availability_zones" "selected" {
  state = "available"
  filter {
    name   = "zone-name"
    values = var.availability_zones
  }

  lifecycle {
    postcondition {
      condition     = length(self.names) == length(var.availability_zones)
      error_message = "Some of availability_zones are not available zones of this region."
    }
  }
}

locals {
  # Keys "az0".."azN" follow the order of var.availability_zones, so they are known at
  # plan time (the interregion module's for_each over route tables and subnets needs
  # that) and a zone keeps its subnets for good.
  azs = { for i, zone in var.availability_zones : "az${i}" => zone }

  # /16 -> /20 subnets: private ones from the bottom of the range, public ones from
  # the middle (room for 8 zones each).
  private_subnet_cidrs = { for i, _ in var.availability_zones : "az${i}" => cidrsubnet(var.vpc_cidr, 4, i) }
  public_subnet_cidrs  = { for i, _ in var.availability_zones : "az${i}" => cidrsubnet(var.vpc_cidr, 4, 8 + i) }
}

resource "aws_vpc" "this" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = merge(local.tags, { Name = local.name })
}

# The default security group allows nothing: every resource names its own.
resource "aws_default_security_group" "default" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.name}-default-deny" })
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = local.name })
}

resource "aws_subnet" "public" {
  for_each                = local.azs
  vpc_id                  = aws_vpc.this.id
  availability_zone       = each.value
  cidr_block              = local.public_subnet_cidrs[each.key]
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "${local.name}-public-${each.value}", Tier = "public" })
}

resource "aws_subnet" "private" {
  for_each                = local.azs
  vpc_id                  = aws_vpc.this.id
  availability_zone       = each.value
  cidr_block              = local.private_subnet_cidrs[each.key]
  map_public_ip_on_launch = false
  tags                    = merge(local.tags, { Name = "${local.name}-private-${each.value}", Tier = "private" })
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.this.id
  tags   = merge(local.tags, { Name = "${local.name}-public" })
}

resource "aws_route" "public_internet" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.this.id
}

resource "aws_route_table_association" "public" {
  for_each       = aws_subnet.public
  subnet_id      = each.value.id
  route_table_id = aws_route_table.public.id
}

resource "aws_eip" "nat" {
  for_each = local.azs
  domain   = "vpc"
  tags     = merge(local.tags, { Name = "${local.name}-nat-${each.value}" })
}

resource "aws_nat_gateway" "this" {
  for_each      = local.azs
  allocation_id = aws_eip.nat[each.key].id
  subnet_id     = aws_subnet.public[each.key].id
  tags          = merge(local.tags, { Name = "${local.name}-${each.value}" })

  depends_on = [aws_internet_gateway.this]
}

# One route table per private subnet: each zone leaves through its own NAT gateway, and
# the interregion module adds the routes to the peer regions here.
resource "aws_route_table" "private" {
  for_each = local.azs
  vpc_id   = aws_vpc.this.id
  tags     = merge(local.tags, { Name = "${local.name}-private-${each.value}" })
}

resource "aws_route" "private_nat" {
  for_each               = local.azs
  route_table_id         = aws_route_table.private[each.key].id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.this[each.key].id
}

resource "aws_route_table_association" "private" {
  for_each       = aws_subnet.private
  subnet_id      = each.value.id
  route_table_id = aws_route_table.private[each.key].id
}

# -- flow logs -------------------------------------------------------------------------

resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/${var.name_prefix}/${var.name}/vpc-flow-logs"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_flow_log" "this" {
  vpc_id          = aws_vpc.this.id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn    = aws_iam_role.flow_logs.arn
  tags            = local.tags
}

resource "aws_iam_role" "flow_logs" {
  name_prefix        = "${local.name}-flow-logs-"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogGroups",
      "logs:DescribeLogStreams",
    ]
    resources = [aws_cloudwatch_log_group.flow_logs.arn, "${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}

# -- security groups ---------------------------------------------------------------------
# Only standalone rule resources, no inline rules: the interregion module adds its rules
# to these groups, and inline rules would fight with them.

resource "aws_security_group" "lb" {
  name_prefix = "${local.name}-lb-"
  description = "relay ${var.name}: the client TLS listener of the load balancer"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-lb" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "nodes" {
  name_prefix = "${local.name}-nodes-"
  description = "relay ${var.name}: the nodes (client, admin and mesh ports)"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-nodes" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "redis" {
  name_prefix = "${local.name}-redis-"
  description = "relay ${var.name}: the ElastiCache replication group (TLS port only)"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-redis" })

  lifecycle {
    create_before_destroy = true
  }
}

# The world (client_cidrs) reaches the load balancer's TLS listener, and only that.
resource "aws_vpc_security_group_ingress_rule" "lb_clients" {
  for_each          = toset(var.client_cidrs)
  security_group_id = aws_security_group.lb.id
  description       = "clients to the TLS listener"
  ip_protocol       = "tcp"
  from_port         = var.listener_port
  to_port           = var.listener_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "lb_to_nodes" {
  security_group_id            = aws_security_group.lb.id
  description                  = "load balancer to the nodes' client port (traffic and health checks)"
  ip_protocol                  = "tcp"
  from_port                    = var.client_port
  to_port                      = var.client_port
  referenced_security_group_id = aws_security_group.nodes.id
}

# The client port is open to the world through the load balancer only.
resource "aws_vpc_security_group_ingress_rule" "nodes_client" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "client port, from the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.client_port
  to_port                      = var.client_port
  referenced_security_group_id = aws_security_group.lb.id
}

# The admin port: operator networks only (admin_cidrs never holds 0.0.0.0/0).
resource "aws_vpc_security_group_ingress_rule" "nodes_admin" {
  for_each          = toset(var.admin_cidrs)
  security_group_id = aws_security_group.nodes.id
  description       = "admin port (/metrics, /status), from an operator network"
  ip_protocol       = "tcp"
  from_port         = var.admin_port
  to_port           = var.admin_port
  cidr_ipv4         = each.value
}

# The mesh: the region's nodes to each other, inside the VPC.
resource "aws_vpc_security_group_ingress_rule" "nodes_mesh" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "mesh port, from the region's other nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.mesh_port
  to_port                      = var.mesh_port
  referenced_security_group_id = aws_security_group.nodes.id
}

resource "aws_vpc_security_group_egress_rule" "nodes_mesh" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "mesh port, to the region's other nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.mesh_port
  to_port                      = var.mesh_port
  referenced_security_group_id = aws_security_group.nodes.id
}

resource "aws_vpc_security_group_egress_rule" "nodes_redis" {
  security_group_id            = aws_security_group.nodes.id
  description                  = "the region's Redis (TLS)"
  ip_protocol                  = "tcp"
  from_port                    = var.redis_port
  to_port                      = var.redis_port
  referenced_security_group_id = aws_security_group.redis.id
}

# HTTPS out, through the NAT gateways: packages (dnf, pip), SSM Parameter Store, KMS,
# Session Manager. DNS, NTP and instance metadata are not filtered by security groups.
resource "aws_vpc_security_group_egress_rule" "nodes_https" {
  security_group_id = aws_security_group.nodes.id
  description       = "HTTPS: packages, SSM, KMS"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_nodes" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis TLS port, from the region's nodes"
  ip_protocol                  = "tcp"
  from_port                    = var.redis_port
  to_port                      = var.redis_port
  referenced_security_group_id = aws_security_group.nodes.id
}
