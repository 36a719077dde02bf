# The clients' entry: an internet-facing network load balancer in the public subnets.
#
# TLS is terminated at the load balancer: its TLS listener holds the ACM certificate
# (certificate_arn) of the name clients dial, with a TLS 1.2/1.3 policy. It then opens a
# new TLS connection to the node's client port (a TLS target group): the node serves
# wss:// with a certificate made on the instance at first boot, which the load balancer
# does not verify. So traffic is encrypted on the wire inside the VPC too, and no real
# private key is ever on an instance. WebSocket connections are long-lived TCP flows; the
# nodes ping every 20 s, well inside the load balancer's 350 s idle timeout.

resource "aws_lb" "this" {
  name                             = local.name
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = [for s in aws_subnet.public : s.id]
  security_groups                  = [aws_security_group.lb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = local.tags

  access_logs {
    bucket  = aws_s3_bucket.lb_logs.id
    prefix  = "nlb"
    enabled = true
  }

  depends_on = [aws_s3_bucket_policy.lb_logs]
}

resource "aws_lb_target_group" "client" {
  name                 = "${local.name}-client"
  port                 = var.client_port
  protocol             = "TLS"
  target_type          = "instance"
  vpc_id               = aws_vpc.this.id
  deregistration_delay = 30
  tags                 = local.tags

  health_check {
    protocol            = "TCP"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 3
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "clients" {
  load_balancer_arn = aws_lb.this.arn
  port              = var.listener_port
  protocol          = "TLS"
  certificate_arn   = var.certificate_arn
  ssl_policy        = var.tls_policy
  tags              = local.tags

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.client.arn
  }
}

# -- access logs -----------------------------------------------------------------------
# One line per TLS connection, into a private bucket encrypted with the region's key
# (the key policy lets the log delivery service use it).

resource "aws_s3_bucket" "lb_logs" {
  #checkov:skip=CKV_AWS_144:Access logs are per-region operational data; replicating them to another region is not needed.
  #checkov:skip=CKV_AWS_18:This bucket receives access logs; logging access to it would need yet another bucket.
  #checkov:skip=CKV2_AWS_62:Nothing consumes events of the log bucket.
  bucket_prefix = "${local.name}-lb-logs-"
  force_destroy = false
  tags          = local.tags
}

resource "aws_s3_bucket_public_access_block" "lb_logs" {
  bucket                  = aws_s3_bucket.lb_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "lb_logs" {
  bucket = aws_s3_bucket.lb_logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "lb_logs" {
  bucket = aws_s3_bucket.lb_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "lb_logs" {
  bucket = aws_s3_bucket.lb_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "lb_logs" {
  bucket = aws_s3_bucket.lb_logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.flow_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_policy" "lb_logs" {
  bucket = aws_s3_bucket.lb_logs.id
  policy = data.aws_iam_policy_document.lb_logs.json

  depends_on = [aws_s3_bucket_public_access_block.lb_logs]
}

# NLB access logs are written by the log delivery service (not an ELB account).
data "aws_iam_policy_document" "lb_logs" {
  statement {
    sid       = "LogDeliveryWrite"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.lb_logs.arn}/nlb/AWSLogs/${local.account_id}/*"]
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

  statement {
    sid       = "LogDeliveryAclCheck"
    actions   = ["s3:GetBucketAcl"]
    resources = [aws_s3_bucket.lb_logs.arn]
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

  statement {
    sid     = "TLSOnly"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.lb_logs.arn,
      "${aws_s3_bucket.lb_logs.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}
