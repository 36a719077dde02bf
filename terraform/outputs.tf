output "client_endpoints" {
  description = "Each region's client endpoint (wss:// through its load balancer). Publish a DNS name of the region's certificate for it; clients connect to the nearest region."
  value = {
    sg  = module.sg.client_url
    fra = module.fra.client_url
    iad = module.iad.client_url
  }

  precondition {
    condition     = sort(keys(var.regions)) == sort(local.declared_regions)
    error_message = "var.regions must describe exactly the regions main.tf has blocks for (sg, fra, iad); docs/DEPLOY.md explains adding or removing one."
  }
}

output "load_balancers" {
  description = "Each region's load balancer DNS name (the target of its client DNS record)."
  value = {
    sg  = module.sg.nlb_dns_name
    fra = module.fra.nlb_dns_name
    iad = module.iad.nlb_dns_name
  }
}

output "redis_endpoints" {
  description = "Each region's Redis primary endpoint (host:port; TLS and AUTH token required)."
  value = {
    sg  = module.sg.redis_endpoint
    fra = module.fra.redis_endpoint
    iad = module.iad.redis_endpoint
  }
}

output "redis_auth_token_parameters" {
  description = "Each region's SSM parameter holding its Redis AUTH token (for relay status and drain)."
  value = {
    sg  = module.sg.redis_auth_token_parameter
    fra = module.fra.redis_auth_token_parameter
    iad = module.iad.redis_auth_token_parameter
  }
}

output "autoscaling_groups" {
  description = "Each region's node autoscaling group (an instance refresh rolls its nodes)."
  value = {
    sg  = module.sg.autoscaling_group_name
    fra = module.fra.autoscaling_group_name
    iad = module.iad.autoscaling_group_name
  }
}
