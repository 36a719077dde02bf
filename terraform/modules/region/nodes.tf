# The nodes: an autoscaling group over the private subnets, one relay node per instance,
# launched from a template whose cloud-init installs relay and runs it under systemd.

data "aws_ssm_parameter" "al2023" {
  count = var.ami_id == "" ? 1 : 0
  name  = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-${var.architecture}"
}

locals {
  ami_id = var.ami_id != "" ? var.ami_id : data.aws_ssm_parameter.al2023[0].insecure_value

  # What each node may read: this region's secrets, and each peer region's Redis token
  # (for cluster.peers). Nothing else.
  secret_parameter_arns = concat(
    [
      aws_ssm_parameter.redis_auth_token.arn,
      aws_ssm_parameter.admin_token.arn,
      aws_ssm_parameter.mesh_secret.arn,
    ],
    aws_ssm_parameter.jwt_hs256_secret[*].arn,
    [for p in var.peers : p.auth_token_parameter_arn],
  )
  secret_kms_key_arns = distinct(concat([aws_kms_key.this.arn], [for p in var.peers : p.kms_key_arn]))
  package_s3_object   = startswith(var.relay_package, "s3://") ? trimprefix(var.relay_package, "s3://") : ""
}

# -- instance role ---------------------------------------------------------------------

resource "aws_iam_role" "node" {
  name_prefix        = "${local.name}-node-"
  description        = "relay ${var.name} nodes"
  assume_role_policy = data.aws_iam_policy_document.node_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "node_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# Session Manager instead of SSH: no key pair, no port 22.
resource "aws_iam_role_policy_attachment" "node_ssm_core" {
  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_role_policy" "node_secrets" {
  name   = "read-relay-secrets"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.node_secrets.json
}

data "aws_iam_policy_document" "node_secrets" {
  statement {
    sid       = "ReadRelaySecretParameters"
    actions   = ["ssm:GetParameter"]
    resources = local.secret_parameter_arns
  }

  statement {
    sid       = "DecryptThemThroughSSM"
    actions   = ["kms:Decrypt"]
    resources = local.secret_kms_key_arns
    condition {
      test     = "StringLike"
      variable = "kms:ViaService"
      values   = ["ssm.*.amazonaws.com"]
    }
  }

  dynamic "statement" {
    for_each = local.package_s3_object == "" ? [] : [local.package_s3_object]
    content {
      sid       = "DownloadTheRelayWheel"
      actions   = ["s3:GetObject"]
      resources = ["arn:${local.partition}:s3:::${statement.value}"]
    }
  }
}

resource "aws_iam_instance_profile" "node" {
  name_prefix = "${local.name}-node-"
  role        = aws_iam_role.node.name
  tags        = local.tags
}

# -- launch template ---------------------------------------------------------------------

resource "aws_launch_template" "node" {
  name_prefix            = "${local.name}-node-"
  description            = "relay ${var.name} node"
  image_id               = local.ami_id
  instance_type          = var.instance_type
  update_default_version = true
  # gzip: cloud-init unpacks it; EC2 limits user data to 16 KiB.
  user_data              = base64gzip(local.user_data)
  vpc_security_group_ids = [aws_security_group.nodes.id]
  ebs_optimized          = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.node.arn
  }

  # IMDSv2 only, and not reachable from containers or forwarded traffic (hop limit 1).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  # The root volume holds the OS, /opt/relay and the data directory /var/lib/relay.
  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.root_volume_size_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${local.name}-node" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${local.name}-node" })
  }

  tags = local.tags

  lifecycle {
    precondition {
      condition     = var.jwt_hs256_secret != "" || var.jwt_es256_public_key_pem != ""
      error_message = "Set jwt_hs256_secret or jwt_es256_public_key_pem: the nodes refuse anonymous clients and must verify tokens."
    }
    precondition {
      condition     = length(distinct([var.client_port, var.admin_port, var.mesh_port])) == 3
      error_message = "client_port, admin_port and mesh_port must differ."
    }
    precondition {
      condition     = length(base64gzip(local.user_data)) <= 21848 # 16 KiB, base64-encoded
      error_message = "The compressed cloud-init user data exceeds EC2's 16 KiB limit."
    }
  }
}

# -- autoscaling group -------------------------------------------------------------------

resource "aws_autoscaling_group" "nodes" {
  name_prefix               = "${local.name}-nodes-"
  min_size                  = var.node_count
  desired_capacity          = var.node_count
  max_size                  = max(var.max_node_count, var.node_count + 1)
  vpc_zone_identifier       = [for s in aws_subnet.private : s.id]
  target_group_arns         = [aws_lb_target_group.client.arn]
  health_check_type         = "ELB"
  health_check_grace_period = 300
  default_instance_warmup   = 120
  termination_policies      = ["OldestLaunchTemplate", "OldestInstance"]
  enabled_metrics           = ["GroupInServiceInstances", "GroupDesiredCapacity", "GroupTerminatingInstances"]

  launch_template {
    id      = aws_launch_template.node.id
    version = aws_launch_template.node.latest_version
  }

  # A new launch template version (new AMI, config, package) replaces the nodes one at
  # a time; each old node drains (SIGTERM) and hands its slots over before it stops.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 66
      instance_warmup        = 120
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${local.name}-node" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}
