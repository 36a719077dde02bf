# Two relay regions, Frankfurt and Virginia, peered: the smallest multi-region relay.
# Smaller than the root module's defaults (2 zones, 2 nodes per region).

provider "aws" {
  alias  = "fra"
  region = var.regions["fra"].aws_region
}

provider "aws" {
  alias  = "iad"
  region = var.regions["iad"].aws_region
}

module "fra" {
  source    = "../../modules/region"
  providers = { aws = aws.fra }

  name               = "fra"
  vpc_cidr           = var.regions["fra"].vpc_cidr
  availability_zones = var.regions["fra"].availability_zones
  node_count         = 2
  certificate_arn    = var.certificate_arns["fra"]
  relay_package      = var.relay_package
  redis_auth_token   = var.redis_auth_tokens["fra"]
  admin_token        = var.admin_token
  mesh_secret        = var.mesh_secrets["fra"]
  jwt_hs256_secret   = var.jwt_hs256_secret
  admin_cidrs        = var.admin_cidrs

  peers = [module.iad.peer]
}

module "iad" {
  source    = "../../modules/region"
  providers = { aws = aws.iad }

  name               = "iad"
  vpc_cidr           = var.regions["iad"].vpc_cidr
  availability_zones = var.regions["iad"].availability_zones
  node_count         = 2
  certificate_arn    = var.certificate_arns["iad"]
  relay_package      = var.relay_package
  redis_auth_token   = var.redis_auth_tokens["iad"]
  admin_token        = var.admin_token
  mesh_secret        = var.mesh_secrets["iad"]
  jwt_hs256_secret   = var.jwt_hs256_secret
  admin_cidrs        = var.admin_cidrs

  peers = [module.fra.peer]
}

module "fra_iad" {
  source    = "../../modules/interregion"
  providers = { aws.requester = aws.fra, aws.accepter = aws.iad }

  requester = module.fra.network
  accepter  = module.iad.network
}
