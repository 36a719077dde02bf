output "client_endpoints" {
  description = "Each region's client endpoint."
  value = {
    fra = module.fra.client_url
    iad = module.iad.client_url
  }
}

output "redis_endpoints" {
  description = "Each region's Redis primary endpoint."
  value = {
    fra = module.fra.redis_endpoint
    iad = module.iad.redis_endpoint
  }
}
