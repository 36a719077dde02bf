terraform {
  required_version = ">= 1.6"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.80, < 7.0"
      # One provider per side of the pair, each configured for its AWS region.
      configuration_aliases = [aws.requester, aws.accepter]
    }
  }
}
