# Inputs of the whole deployment: one relay region per AWS region, peered with each other.
# main.tf holds one provider block and one module block per region (Terraform cannot
# make providers from a variable); `regions` describes them. docs/DEPLOY.md: adding one.

variable "regions" {
  description = "The relay regions, by relay region name: the AWS region each runs in, its VPC CIDR (CIDRs must not overlap: the VPCs are peered), the zones it spans, plus optional sizing."
  type = map(object({
    aws_region         = string
    vpc_cidr           = string
    availability_zones = list(string)
    node_count         = optional(number, 3)
    instance_type      = optional(string, "c7i.large")
    redis_node_type    = optional(string, "cache.r7g.large")
  }))
  default = {
    sg = {
      aws_region         = "ap-southeast-1"
      vpc_cidr           = "10.20.0.0/16"
      availability_zones = ["ap-southeast-1a", "ap-southeast-1b", "ap-southeast-1c"]
    }
    fra = {
      aws_region         = "eu-central-1"
      vpc_cidr           = "10.30.0.0/16"
      availability_zones = ["eu-central-1a", "eu-central-1b", "eu-central-1c"]
    }
    iad = {
      aws_region         = "us-east-1"
      vpc_cidr           = "10.40.0.0/16"
      availability_zones = ["us-east-1a", "us-east-1b", "us-east-1c"]
    }
  }

  validation {
    condition     = alltrue([for name, _ in var.regions : can(regex("^[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?$", name)) && !can(regex("--", name))])
    error_message = "Region names must be 1-16 characters of a-z, 0-9 and \"-\", not starting or ending with \"-\", without \"--\"."
  }

  validation {
    condition = alltrue([
      for r in var.regions : can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+/[0-9]+$", r.vpc_cidr)) && can(cidrhost(r.vpc_cidr, 0))
    ])
    error_message = "Every vpc_cidr must be an IPv4 CIDR such as \"10.20.0.0/16\"."
  }

  # Two CIDRs overlap exactly when their network addresses agree on the shorter of the
  # two prefixes: cut both to that length (cidrhost of "<address>/<len>" is the network
  # address) and compare.
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
  description = "ACM certificate ARN for each region's client TLS listener, by region name (each in that region's AWS region)."
  type        = map(string)
}

variable "relay_package" {
  description = "What the nodes install with pip: a requirement such as \"relay @ https://example.com/relay-0.1.0-py3-none-any.whl\", or an s3:// URI of a wheel."
  type        = string
}

variable "redis_auth_tokens" {
  description = "Each region's Redis AUTH token, by region name: 16-128 characters of letters, digits and !&#$^<>-."
  type        = map(string)
  sensitive   = true

  validation {
    condition     = alltrue([for t in values(var.redis_auth_tokens) : can(regex("^[A-Za-z0-9!&#$^<>-]{16,128}$", t))])
    error_message = "Every Redis AUTH token must be 16-128 characters of A-Z, a-z, 0-9 and !&#$^<>-."
  }
}

variable "redis_auth_token_update_strategy" {
  description = "ROTATE while a token change rolls out (old and new both valid), then SET. See docs/DEPLOY.md."
  type        = string
  default     = "ROTATE"
}

variable "admin_token" {
  description = "Bearer token of every node's admin port (32+ characters)."
  type        = string
  sensitive   = true
}

variable "mesh_secrets" {
  description = "Each region's mesh secret (relay cluster.mesh_secret), by region name: 32+ characters without whitespace, different in every region."
  type        = map(string)
  sensitive   = true
}

variable "jwt_hs256_secret" {
  description = "Secret that verifies HS256 client tokens, the same in every region (a token works wherever its holder connects). Set this or jwt_es256_public_key_pem."
  type        = string
  default     = ""
  sensitive   = true
}

variable "jwt_es256_public_key_pem" {
  description = "PEM public key that verifies ES256 client tokens, in every region."
  type        = string
  default     = ""
}

variable "client_cidrs" {
  description = "Who may reach the client TLS listeners."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "admin_cidrs" {
  description = "Operator networks that may reach the nodes' admin ports (never 0.0.0.0/0)."
  type        = list(string)
  default     = []
}

variable "deletion_protection" {
  description = "Protect the load balancers from deletion."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags on every resource (provider default tags), and on the instances and volumes the autoscaling groups launch."
  type        = map(string)
  default     = { "app" = "relay" }
}
