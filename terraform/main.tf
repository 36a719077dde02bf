# relay in three AWS regions (sg, fra, iad by default): in each, one region module with
# its own aliased aws provider; between each pair, one interregion module (VPC peering,
# routes, and the Redis TLS port). Each region's nodes get every other region's Redis
# in cluster.peers, so the links copy its slot logs everywhere.
#
# Adding a region: an entry in var.regions (and certificate_arns, redis_auth_tokens, mesh_secrets),
# a provider block, a module block, one interregion block per existing region, and the
# new module in every other region's peers and in the outputs. docs/DEPLOY.md.

locals {
  # The regions this file has blocks for; var.regions must describe exactly these.
  declared_regions = ["sg", "fra", "iad"]
}

provider "aws" {
  alias  = "sg"
  region = var.regions["sg"].aws_region
  default_tags {
    tags = var.tags
  }
}

provider "aws" {
  alias  = "fra"
  region = var.regions["fra"].aws_region
  default_tags {
    tags = var.tags
  }
}

provider "aws" {
  alias  = "iad"
  region = var.regions["iad"].aws_region
  default_tags {
    tags = var.tags
  }
}

# -- regions -------------------------------------------------------------------------

module "sg" {
  source    = "./modules/region"
  providers = { aws = aws.sg }

  name               = "sg"
  vpc_cidr           = var.regions["sg"].vpc_cidr
  availability_zones = var.regions["sg"].availability_zones
  node_count         = var.regions["sg"].node_count
  instance_type      = var.regions["sg"].instance_type
  redis_node_type    = var.regions["sg"].redis_node_type
  certificate_arn    = var.certificate_arns["sg"]

  redis_auth_token                 = var.redis_auth_tokens["sg"]
  redis_auth_token_update_strategy = var.redis_auth_token_update_strategy
  relay_package                    = var.relay_package
  admin_token                      = var.admin_token
  mesh_secret                      = var.mesh_secrets["sg"]
  jwt_hs256_secret                 = var.jwt_hs256_secret
  jwt_es256_public_key_pem         = var.jwt_es256_public_key_pem
  client_cidrs                     = var.client_cidrs
  admin_cidrs                      = var.admin_cidrs
  deletion_protection              = var.deletion_protection
  tags                             = var.tags

  peers = [module.fra.peer, module.iad.peer]
}

module "fra" {
  source    = "./modules/region"
  providers = { aws = aws.fra }

  name               = "fra"
  vpc_cidr           = var.regions["fra"].vpc_cidr
  availability_zones = var.regions["fra"].availability_zones
  node_count         = var.regions["fra"].node_count
  instance_type      = var.regions["fra"].instance_type
  redis_node_type    = var.regions["fra"].redis_node_type
  certificate_arn    = var.certificate_arns["fra"]

  redis_auth_token                 = var.redis_auth_tokens["fra"]
  redis_auth_token_update_strategy = var.redis_auth_token_update_strategy
  relay_package                    = var.relay_package
  admin_token                      = var.admin_token
  mesh_secret                      = var.mesh_secrets["fra"]
  jwt_hs256_secret                 = var.jwt_hs256_secret
  jwt_es256_public_key_pem         = var.jwt_es256_public_key_pem
  client_cidrs                     = var.client_cidrs
  admin_cidrs                      = var.admin_cidrs
  deletion_protection              = var.deletion_protection
  tags                             = var.tags

  peers = [module.sg.peer, module.iad.peer]
}

module "iad" {
  source    = "./modules/region"
  providers = { aws = aws.iad }

  name               = "iad"
  vpc_cidr           = var.regions["iad"].vpc_cidr
  availability_zones = var.regions["iad"].availability_zones
  node_count         = var.regions["iad"].node_count
  instance_type      = var.regions["iad"].instance_type
  redis_node_type    = var.regions["iad"].redis_node_type
  certificate_arn    = var.certificate_arns["iad"]

  redis_auth_token                 = var.redis_auth_tokens["iad"]
  redis_auth_token_update_strategy = var.redis_auth_token_update_strategy
  relay_package                    = var.relay_package
  admin_token                      = var.admin_token
  mesh_secret                      = var.mesh_secrets["iad"]
  jwt_hs256_secret                 = var.jwt_hs256_secret
  jwt_es256_public_key_pem         = var.jwt_es256_public_key_pem
  client_cidrs                     = var.client_cidrs
  admin_cidrs                      = var.admin_cidrs
  deletion_protection              = var.deletion_protection
  tags                             = var.tags

  peers = [module.sg.peer, module.fra.peer]
}

# -- every pair of regions -------------------------------------------------------------

module "sg_fra" {
  source    = "./modules/interregion"
  providers = { aws.requester = aws.sg, aws.accepter = aws.fra }

  requester = module.sg.network
  accepter  = module.fra.network
  tags      = var.tags
}

module "sg_iad" {
  source    = "./modules/interregion"
  providers = { aws.requester = aws.sg, aws.accepter = aws.iad }

  requester = module.sg.network
  accepter  = module.iad.network
  tags      = var.tags
}

module "fra_iad" {
  source    = "./modules/interregion"
  providers = { aws.requester = aws.fra, aws.accepter = aws.iad }

  requester = module.fra.network
  accepter  = module.iad.network
  tags      = var.tags
}
