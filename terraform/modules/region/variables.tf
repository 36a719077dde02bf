# Inputs of one relay region: one AWS region's VPC, node autoscaling group, network load
# balancer and ElastiCache replication group. Every secret is a sensitive variable; the
# module stores them in SSM Parameter Store (SecureString, this region's KMS key) and the
# nodes read them at start, so no secret is written into the launch template's user data.

# -- identity -------------------------------------------------------------------------

variable "name" {
  description = "The relay region name (the part of every node id before \"/\"), e.g. \"sg\"."
  type        = string

  validation {
    # The node-id rule of relay/config.py, narrowed to what AWS names built from it
    # accept: "<name_prefix>-<name>-client" (a target group) within 32 characters, no
    # "-" at the end and no "--" (ElastiCache replication group ids).
    condition     = can(regex("^[a-z0-9](?:[a-z0-9-]{0,14}[a-z0-9])?$", var.name)) && !can(regex("--", var.name))
    error_message = "name must be 1-16 characters of a-z, 0-9 and \"-\", not starting or ending with \"-\", without \"--\"."
  }
}

variable "name_prefix" {
  description = "Prefix of every AWS resource name; resources are named \"<name_prefix>-<name>-...\"."
  type        = string
  default     = "relay"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,7}$", var.name_prefix))
    error_message = "name_prefix must be 1-8 characters of a-z, 0-9 and \"-\", starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource of the region."
  type        = map(string)
  default     = {}
}

# -- network --------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "The region's VPC CIDR (IPv4, /16 to /22). Must not overlap any other region's: the regions are peered."
  type        = string

  validation {
    condition = (
      can(cidrhost(var.vpc_cidr, 0))
      && can(regex("^[0-9.]+/[0-9]+$", var.vpc_cidr))
      && try(tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 22, false)
    )
    error_message = "vpc_cidr must be an IPv4 CIDR from /16 to /22, e.g. \"10.10.0.0/16\"."
  }
}

variable "availability_zones" {
  description = "The zones the region spans (2-4 names, e.g. [\"eu-central-1a\", \"eu-central-1b\", \"eu-central-1c\"]): one private and one public subnet, and one NAT gateway, in each. Pinned, so the subnets never move when AWS adds a zone."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 4 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "availability_zones must name 2 to 4 distinct zones: the nodes and Redis span at least two."
  }
}

variable "client_cidrs" {
  description = "Who may connect to the client TLS listener of the load balancer."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0))])
    error_message = "client_cidrs must be a non-empty list of IPv4 CIDRs."
  }
}

variable "admin_cidrs" {
  description = "Operator networks that may reach each node's admin port (/metrics, /status). Never the whole internet; empty = nobody."
  type        = list(string)
  default     = []

  validation {
    condition = alltrue([
      for c in var.admin_cidrs : can(cidrhost(c, 0)) && !contains(["0.0.0.0/0", "::/0"], c)
    ])
    error_message = "admin_cidrs must be IPv4 CIDRs, and not 0.0.0.0/0: the admin port can drain nodes."
  }
}

variable "flow_log_retention_days" {
  description = "How long VPC flow logs and ElastiCache logs are kept in CloudWatch Logs."
  type        = number
  default     = 365
}

# -- client listener ------------------------------------------------------------------

variable "certificate_arn" {
  description = "ACM certificate (in this AWS region) for the load balancer's TLS listener: the name clients dial."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:acm:[a-z0-9-]+:[0-9]{12}:certificate/.+$", var.certificate_arn))
    error_message = "certificate_arn must be an ACM certificate ARN."
  }
}

variable "listener_port" {
  description = "The load balancer's public TLS port (clients dial wss://<name>:<port>/v1/ws)."
  type        = number
  default     = 443
}

variable "tls_policy" {
  description = "Security policy of the TLS listener."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"
}

variable "deletion_protection" {
  description = "Refuse to delete the load balancer (set false only for throwaway regions)."
  type        = bool
  default     = true
}

# -- nodes ----------------------------------------------------------------------------

variable "relay_package" {
  description = "What the nodes install with pip: a requirement such as \"relay @ https://example.com/relay-0.1.0-py3-none-any.whl\", or an s3:// URI of a wheel (the nodes may read that object)."
  type        = string

  validation {
    condition     = length(trimspace(var.relay_package)) > 0 && !can(regex("[\\s'\"]", var.relay_package))
    error_message = "relay_package must be one pip requirement or s3:// URI, without spaces or quotes."
  }
}

variable "instance_type" {
  description = "EC2 instance type of the nodes. One node is one process on one core; each instance runs one node."
  type        = string
  default     = "c7i.large"
}

variable "architecture" {
  description = "CPU architecture of instance_type, for the default Amazon Linux 2023 AMI: x86_64 or arm64."
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "ami_id" {
  description = "AMI of the nodes (Amazon Linux 2023 or compatible: dnf, python3.11, systemd). Empty = the latest Amazon Linux 2023 at plan time; pin it in production so a new AMI does not roll the nodes."
  type        = string
  default     = ""
}

variable "node_count" {
  description = "Nodes (instances) the autoscaling group keeps running."
  type        = number
  default     = 3

  validation {
    condition     = var.node_count >= 2
    error_message = "node_count must be at least 2: a slot has an owner and a replica (cluster.replicas = 2)."
  }
}

variable "max_node_count" {
  description = "Upper bound of the autoscaling group (room for rolling replacements and growth)."
  type        = number
  default     = 6
}

variable "root_volume_size_gb" {
  description = "Size of each node's encrypted root volume, which also holds the data directory (/var/lib/relay)."
  type        = number
  default     = 20
}

variable "client_port" {
  description = "Node port for clients (relay client.port); the load balancer forwards to it."
  type        = number
  default     = 7400
}

variable "admin_port" {
  description = "Node admin HTTP port (relay admin.port): /metrics and /status, token required."
  type        = number
  default     = 7401
}

variable "mesh_port" {
  description = "Node mesh port (relay cluster.mesh_port), reached only by the region's other nodes."
  type        = number
  default     = 7402
}

variable "allowed_origins" {
  description = "relay client.allowed_origins: browser Origin patterns allowed to connect (empty = any)."
  type        = list(string)
  default     = []
}

variable "admin_token" {
  description = "Bearer token of the nodes' admin port (relay admin.token). 32+ characters."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.admin_token) >= 32 && !can(regex("[\\s]", var.admin_token))
    error_message = "admin_token must be at least 32 characters, without whitespace."
  }
}

variable "mesh_secret" {
  description = "The region's mesh secret (relay cluster.mesh_secret): nodes prove it to each other before any mesh op. 32+ characters, the same on every node of the region."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.mesh_secret) >= 32 && !can(regex("[\\s]", var.mesh_secret))
    error_message = "mesh_secret must be at least 32 characters, without whitespace."
  }
}

variable "jwt_hs256_secret" {
  description = "Shared secret that verifies HS256 client tokens (relay auth.hs256_secret); empty = HS256 off. Set this or jwt_es256_public_key_pem."
  type        = string
  default     = ""
  sensitive   = true

  validation {
    condition     = var.jwt_hs256_secret == "" || length(var.jwt_hs256_secret) >= 32
    error_message = "jwt_hs256_secret must be empty or at least 32 characters."
  }
}

variable "jwt_es256_public_key_pem" {
  description = "PEM public key that verifies ES256 client tokens (relay auth.es256_public_key); empty = ES256 off."
  type        = string
  default     = ""

  validation {
    condition     = var.jwt_es256_public_key_pem == "" || can(regex("-----BEGIN PUBLIC KEY-----", var.jwt_es256_public_key_pem))
    error_message = "jwt_es256_public_key_pem must be empty or a PEM public key."
  }
}

# -- Redis (ElastiCache) ------------------------------------------------------------------

variable "redis_engine" {
  description = "ElastiCache engine: valkey or redis."
  type        = string
  default     = "valkey"

  validation {
    condition     = contains(["valkey", "redis"], var.redis_engine)
    error_message = "redis_engine must be valkey or redis."
  }
}

variable "redis_engine_version" {
  description = "Engine version; its major version picks the parameter group family (valkey8, redis7, ...)."
  type        = string
  default     = "8.0"
}

variable "redis_node_type" {
  description = "ElastiCache node type. Pending messages live in the nodes' RAM; Redis holds the slot logs and checkpoints."
  type        = string
  default     = "cache.r7g.large"
}

variable "redis_replicas" {
  description = "Read replicas next to the primary (1-5), in other zones: automatic failover needs at least one."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_replicas >= 1 && var.redis_replicas <= 5
    error_message = "redis_replicas must be 1-5."
  }
}

variable "redis_port" {
  description = "Port of the replication group; with transit encryption it speaks TLS only."
  type        = number
  default     = 6379
}

variable "redis_auth_token" {
  description = "AUTH token of this region's Redis: 16-128 characters of letters, digits and !&#$^<>- (ElastiCache's rule)."
  type        = string
  sensitive   = true

  validation {
    condition     = can(regex("^[A-Za-z0-9!&#$^<>-]{16,128}$", var.redis_auth_token))
    error_message = "redis_auth_token must be 16-128 characters of A-Z, a-z, 0-9 and !&#$^<>-."
  }
}

variable "redis_auth_token_update_strategy" {
  description = "How a changed redis_auth_token is applied: ROTATE (old and new both valid; roll the nodes), then SET (only the new one). See docs/DEPLOY.md."
  type        = string
  default     = "ROTATE"

  validation {
    condition     = contains(["ROTATE", "SET"], var.redis_auth_token_update_strategy)
    error_message = "redis_auth_token_update_strategy must be ROTATE or SET."
  }
}

variable "redis_snapshot_retention_days" {
  description = "Daily Redis snapshots kept (slot logs and checkpoints hold messages not yet delivered)."
  type        = number
  default     = 7
}

variable "apply_immediately" {
  description = "Apply Redis changes now rather than in the maintenance window."
  type        = bool
  default     = false
}

# -- other regions ----------------------------------------------------------------------

variable "peers" {
  description = "The other relay regions (their module's `peer` output): written into each node's cluster.peers, so links copy this region's slot logs into theirs."
  type = list(object({
    name                     = string
    aws_region               = string
    redis_host               = string
    redis_port               = number
    auth_token_parameter     = string
    auth_token_parameter_arn = string
    kms_key_arn              = string
  }))
  default = []
}
