output "client_url" {
  description = "What clients dial (through the load balancer's TLS listener). Point a DNS name of certificate_arn at nlb_dns_name and use that name instead."
  value       = "wss://${aws_lb.this.dns_name}${var.listener_port == 443 ? "" : ":${var.listener_port}"}/v1/ws"
}

output "nlb_dns_name" {
  description = "DNS name of the network load balancer (CNAME or alias target)."
  value       = aws_lb.this.dns_name
}

output "nlb_zone_id" {
  description = "Route 53 zone id of the load balancer, for an alias record."
  value       = aws_lb.this.zone_id
}

output "redis_endpoint" {
  description = "The region's Redis primary endpoint, host:port (TLS, AUTH token)."
  value       = "${aws_elasticache_replication_group.this.primary_endpoint_address}:${var.redis_port}"
}

output "redis_url" {
  description = "The region's Redis URL without its token (the token is in SSM: redis_auth_token_parameter)."
  value       = "rediss://${aws_elasticache_replication_group.this.primary_endpoint_address}:${var.redis_port}"
}

output "redis_auth_token_parameter" {
  description = "SSM parameter (SecureString) holding the Redis AUTH token."
  value       = aws_ssm_parameter.redis_auth_token.name
}

output "admin_token_parameter" {
  description = "SSM parameter (SecureString) holding the nodes' admin token."
  value       = aws_ssm_parameter.admin_token.name
}

output "autoscaling_group_name" {
  description = "The nodes' autoscaling group (start an instance refresh on it to roll the nodes)."
  value       = aws_autoscaling_group.nodes.name
}

output "kms_key_arn" {
  description = "The region's KMS key."
  value       = aws_kms_key.this.arn
}

# What the other regions' modules take in `peers`. Depends only on Redis, SSM and KMS
# (never on the nodes), so regions can name each other without a dependency cycle.
output "peer" {
  description = "This region as a peer of the others."
  value = {
    name                     = var.name
    aws_region               = local.aws_region
    redis_host               = aws_elasticache_replication_group.this.primary_endpoint_address
    redis_port               = var.redis_port
    auth_token_parameter     = aws_ssm_parameter.redis_auth_token.name
    auth_token_parameter_arn = aws_ssm_parameter.redis_auth_token.arn
    kms_key_arn              = aws_kms_key.this.arn
  }
}

# What the interregion module takes: where to route to and whom to let in.
output "network" {
  description = "This region's network, for the interregion module."
  value = {
    name                    = var.name
    aws_region              = local.aws_region
    vpc_id                  = aws_vpc.this.id
    vpc_cidr                = var.vpc_cidr
    private_subnet_cidrs    = local.private_subnet_cidrs
    private_route_table_ids = { for k, rt in aws_route_table.private : k => rt.id }
    node_security_group_id  = aws_security_group.nodes.id
    redis_security_group_id = aws_security_group.redis.id
    redis_port              = var.redis_port
  }
}
