# One relay region in one AWS region. The resources are spread over files by concern:
#
#   main.tf          names, the region's KMS key, secrets in SSM Parameter Store,
#                    the node config rendered from templates/ (cloud-init + relay TOML)
#   network.tf       VPC, subnets in the pinned zones, NAT, flow logs, security groups
#   redis.tf         the ElastiCache (Valkey/Redis) replication group
#   nodes.tf         instance role, launch template, autoscaling group
#   loadbalancer.tf  the network load balancer and its TLS listener

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  name       = "${var.name_prefix}-${var.name}"
  aws_region = data.aws_region.current.id
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition

  # Whether HS256 is on is no secret; the secret is. (Keeps the user data, and the
  # count below, free of sensitive values.)
  hs256_enabled = nonsensitive(var.jwt_hs256_secret != "")

  tags = merge(var.tags, {
    "relay:region" = var.name
  })
}

# -- the region's customer-managed KMS key -----------------------------------------------
# Encrypts the SSM parameters, ElastiCache at rest, the CloudWatch log groups and the
# load balancer's access logs.

resource "aws_kms_key" "this" {
  description             = "${local.name}: relay secrets, Redis at rest, logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${local.name}"
  target_key_id = aws_kms_key.this.key_id
}

data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy's Resource "*" is this key only; the account root statement is the standard delegation to IAM policies.
  #checkov:skip=CKV_AWS_111:A key policy's Resource "*" is this key only; besides the account (IAM), only CloudWatch Logs and log delivery may use it, each under a condition.
  #checkov:skip=CKV_AWS_356:A key policy's Resource "*" is this key only (key policies cannot name their key's ARN).
  statement {
    sid       = "AccountAdministersKeyThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsThisRegionsLogGroups"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.aws_region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${local.aws_region}:${local.account_id}:log-group:/${var.name_prefix}/${var.name}/*"]
    }
  }

  statement {
    sid       = "LogDeliveryWritesLoadBalancerAccessLogs"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["delivery.logs.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

# -- secrets -------------------------------------------------------------------------------
# The nodes read these at every start (relay-bootstrap render); see docs/DEPLOY.md for
# rotating them. Peer regions' nodes read redis_auth_token too (their cluster.peers).

resource "aws_ssm_parameter" "redis_auth_token" {
  name        = "/${var.name_prefix}/${var.name}/redis-auth-token"
  description = "AUTH token of ${local.name}'s ElastiCache replication group"
  type        = "SecureString"
  key_id      = aws_kms_key.this.arn
  value       = var.redis_auth_token
  tags        = local.tags
}

resource "aws_ssm_parameter" "admin_token" {
  name        = "/${var.name_prefix}/${var.name}/admin-token"
  description = "Bearer token of ${local.name}'s node admin ports"
  type        = "SecureString"
  key_id      = aws_kms_key.this.arn
  value       = var.admin_token
  tags        = local.tags
}

resource "aws_ssm_parameter" "mesh_secret" {
  name        = "/${var.name_prefix}/${var.name}/mesh-secret"
  description = "Secret the nodes of ${local.name} prove to each other on the mesh"
  type        = "SecureString"
  key_id      = aws_kms_key.this.arn
  value       = var.mesh_secret
  tags        = local.tags
}

resource "aws_ssm_parameter" "jwt_hs256_secret" {
  count       = local.hs256_enabled ? 1 : 0
  name        = "/${var.name_prefix}/${var.name}/jwt-hs256-secret"
  description = "Secret that verifies HS256 client tokens in ${local.name}"
  type        = "SecureString"
  key_id      = aws_kms_key.this.arn
  value       = var.jwt_hs256_secret
  tags        = local.tags
}

# -- the node's files, rendered from templates/ ------------------------------------------
# Values known only on the instance (its id, its private IP) and the secrets are
# __PLACEHOLDERS__ that files/relay-bootstrap.py fills in before each start of relay.

locals {
  etc_dir          = "/etc/relay"
  tls_cert_path    = "/etc/relay/tls/node.crt"
  tls_key_path     = "/etc/relay/tls/node.key"
  es256_key_path   = "/etc/relay/jwt-es256.pem"
  data_dir         = "/var/lib/relay"
  redis_host       = aws_elasticache_replication_group.this.primary_endpoint_address
  peer_placeholder = { for p in var.peers : p.name => "PEER_${upper(replace(p.name, "-", "_"))}_REDIS_AUTH_TOKEN" }

  relay_toml = templatefile("${path.module}/templates/relay.toml.tftpl", {
    region                = var.name
    data_dir              = local.data_dir
    client_port           = var.client_port
    tls_cert_path         = local.tls_cert_path
    tls_key_path          = local.tls_key_path
    allowed_origins       = var.allowed_origins
    hs256_enabled         = local.hs256_enabled
    es256_public_key_path = var.jwt_es256_public_key_pem == "" ? "" : local.es256_key_path
    admin_port            = var.admin_port
    redis_host            = local.redis_host
    redis_port            = var.redis_port
    mesh_port             = var.mesh_port
    peers = [for p in var.peers : {
      name        = p.name
      redis_host  = p.redis_host
      redis_port  = p.redis_port
      placeholder = local.peer_placeholder[p.name]
    }]
  })

  # Where relay-bootstrap finds each __PLACEHOLDER__'s value. "url" values are
  # percent-encoded (they sit in a rediss:// URL); "optional" ones may be missing (a peer
  # region's SSM unreachable): the config line that names one is then left out.
  bootstrap_settings = {
    aws_region    = local.aws_region
    relay_package = var.relay_package
    python        = "python3.11"
    venv          = "/opt/relay"
    template      = "${local.etc_dir}/node.toml.in"
    config        = "${local.etc_dir}/node.toml"
    tls_cert      = local.tls_cert_path
    tls_key       = local.tls_key_path
    secrets = merge(
      {
        REDIS_AUTH_TOKEN = {
          region    = local.aws_region
          parameter = aws_ssm_parameter.redis_auth_token.name
          quote     = "url"
          optional  = false
        }
        ADMIN_TOKEN = {
          region    = local.aws_region
          parameter = aws_ssm_parameter.admin_token.name
          quote     = "none"
          optional  = false
        }
        MESH_SECRET = {
          region    = local.aws_region
          parameter = aws_ssm_parameter.mesh_secret.name
          quote     = "none"
          optional  = false
        }
      },
      local.hs256_enabled ? {
        AUTH_HS256_SECRET = {
          region    = local.aws_region
          parameter = aws_ssm_parameter.jwt_hs256_secret[0].name
          quote     = "none"
          optional  = false
        }
      } : {},
      { for p in var.peers : local.peer_placeholder[p.name] => {
        region    = p.aws_region
        parameter = p.auth_token_parameter
        quote     = "url"
        optional  = true
      } },
    )
  }

  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    relay_toml               = local.relay_toml
    bootstrap_json           = jsonencode(local.bootstrap_settings)
    bootstrap_script         = file("${path.module}/files/relay-bootstrap.py")
    relay_service            = file("${path.module}/files/relay.service")
    jwt_es256_public_key_pem = var.jwt_es256_public_key_pem
    es256_public_key_path    = local.es256_key_path
  })
}
