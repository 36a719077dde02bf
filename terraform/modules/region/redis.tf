# The region's Redis: an ElastiCache (Valkey or Redis OSS) replication group, cluster mode
# disabled (the nodes use one redis:// connection; every key of a slot carries the
# {region:slot} hash tag, so moving to cluster mode later needs no key change).
# TLS in transit (required), encrypted at rest with the region's key, AUTH token, a
# primary and redis_replicas replicas in other zones with automatic failover.

locals {
  redis_family = "${var.redis_engine}${split(".", var.redis_engine_version)[0]}"
}

resource "aws_elasticache_subnet_group" "this" {
  name        = local.name
  description = "relay ${var.name}: private subnets"
  subnet_ids  = [for s in aws_subnet.private : s.id]
  tags        = local.tags
}

resource "aws_elasticache_parameter_group" "this" {
  name        = "${local.name}-${local.redis_family}"
  family      = local.redis_family
  description = "relay ${var.name}: keyspace notifications, no eviction"
  tags        = local.tags

  # Nodes learn of expired leases from keyspace notifications; ElastiCache refuses the
  # CONFIG SET a node would otherwise send (docs/OPERATIONS.md).
  parameter {
    name  = "notify-keyspace-events"
    value = "Ex"
  }

  # Slot logs, checkpoints and leases must never be evicted to make room.
  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_cloudwatch_log_group" "redis" {
  name              = "/${var.name_prefix}/${var.name}/redis-engine-log"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = aws_kms_key.this.arn
  tags              = local.tags
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id = local.name
  description          = "relay ${var.name}: slot logs, leases, checkpoints, mirrors"
  engine               = var.redis_engine
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  port                 = var.redis_port
  parameter_group_name = aws_elasticache_parameter_group.this.name
  subnet_group_name    = aws_elasticache_subnet_group.this.name
  security_group_ids   = [aws_security_group.redis.id]

  num_cache_clusters         = var.redis_replicas + 1
  automatic_failover_enabled = true
  multi_az_enabled           = true

  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.this.arn
  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  auth_token                 = var.redis_auth_token
  auth_token_update_strategy = var.redis_auth_token_update_strategy

  snapshot_retention_limit   = var.redis_snapshot_retention_days
  snapshot_window            = "03:00-04:00"
  maintenance_window         = "sun:05:00-sun:06:00"
  auto_minor_version_upgrade = true
  apply_immediately          = var.apply_immediately

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.redis.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "engine-log"
  }

  tags = local.tags
}
