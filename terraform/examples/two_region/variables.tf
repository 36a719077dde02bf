variable "regions" {
  description = "The two relay regions: AWS region, VPC CIDR (must not overlap), zones."
  type = map(object({
    aws_region         = string
    vpc_cidr           = string
    availability_zones = list(string)
  }))
  default = {
    fra = {
      aws_region         = "eu-central-1"
      vpc_cidr           = "10.30.0.0/16"
      availability_zones = ["eu-central-1a", "eu-central-1b"]
    }
    iad = {
      aws_region         = "us-east-1"
      vpc_cidr           = "10.40.0.0/16"
      availability_zones = ["us-east-1a", "us-east-1b"]
    }
  }

  validation {
    condition = alltrue([
      for r in var.regions : can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+/[0-9]+$", r.vpc_cidr)) && can(cidrhost(r.vpc_cidr, 0))
    ])
    error_message = "Every vpc_cidr must be an IPv4 CIDR such as \"10.30.0.0/16\"."
  }

  # Overlap test as in the root module: compare network addresses at the shorter prefix.
  validation {
    condition = alltrue(flatten([
      for a, ra in var.regions : [
        for b, rb in var.regions : a == b || try(
          cidrhost(format("%s/%d", cidrhost(ra.vpc_cidr, 0), min(tonumber(split("/", ra.vpc_cidr)[1]), tonumber(split("/", rb.vpc_cidr)[1]))), 0)
          != cidrhost(format("%s/%d", cidrhost(rb.vpc_cidr, 0), min(tonumber(split("/", ra.vpc_cidr)[1]), tonumber(split("/", rb.vpc_cidr)[1]))), 0),
          false
        )
      ]
    ]))
    error_message = "The regions' vpc_cidr ranges overlap: peered VPCs need disjoint CIDRs."
  }
}

variable "certificate_arns" {
  description = "ACM certificate ARN of each region's client listener, by region name."
  type        = map(string)
}

variable "relay_package" {
  description = "pip requirement or s3:// URI of the relay wheel the nodes install."
  type        = string
}

variable "redis_auth_tokens" {
  description = "Each region's Redis AUTH token, by region name."
  type        = map(string)
  sensitive   = true
}

variable "admin_token" {
  description = "Bearer token of the nodes' admin ports."
  type        = string
  sensitive   = true
}

variable "mesh_secrets" {
  description = "Each region's mesh secret, by region name (32+ characters)."
  type        = map(string)
  sensitive   = true
}

variable "jwt_hs256_secret" {
  description = "Secret that verifies HS256 client tokens in both regions."
  type        = string
  sensitive   = true
}

variable "admin_cidrs" {
  description = "Operator networks that may reach the admin ports."
  type        = list(string)
  default     = []
}
