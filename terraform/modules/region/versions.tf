terraform {
  # 1.6: optional() object attributes, check blocks, and stable cross-variable validation
  # messages; nothing newer is needed.
  required_version = ">= 1.6"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.80: Valkey engine on replication groups, auth_token_update_strategy, NLB
      # security groups. 6.x is accepted too.
      version = ">= 5.80, < 7.0"
    }
  }
}
