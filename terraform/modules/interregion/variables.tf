# The two regions of the pair: each is a region module's `network` output.

variable "requester" {
  description = "The region that requests the peering (its aws.requester provider)."
  type = object({
    name                    = string
    aws_region              = string
    vpc_id                  = string
    vpc_cidr                = string
    private_subnet_cidrs    = map(string)
    private_route_table_ids = map(string)
    node_security_group_id  = string
    redis_security_group_id = string
    redis_port              = number
  })
}

variable "accepter" {
  description = "The region that accepts the peering (its aws.accepter provider)."
  type = object({
    name                    = string
    aws_region              = string
    vpc_id                  = string
    vpc_cidr                = string
    private_subnet_cidrs    = map(string)
    private_route_table_ids = map(string)
    node_security_group_id  = string
    redis_security_group_id = string
    redis_port              = number
  })
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
