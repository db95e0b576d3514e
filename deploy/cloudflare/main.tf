# Cloudflare Load Balancing in front of geogate's regions: a monitor on each region
# gateway's /v2/health/ready (200 only when that region can serve), one pool per region,
# and a load balancer with geo steering (each Cloudflare geographic region to its nearest
# geogate region, falling back down the list when a pool is unhealthy).
#
#   cd deploy/cloudflare && terraform init && terraform plan -var account_id=... -var zone_id=...
#
# proxied = false: DNS-only load balancing, so gRPC and HTTP clients connect straight to the
# gateways (no Cloudflare proxy in the data path; geogate sees the client's address).
# Written for the Cloudflare provider 4.x schema (blocks for origins/region_pools).

terraform {
  required_version = ">= 1.5"
  required_providers {
    cloudflare = {
      source  = "cloudflare/cloudflare"
      version = "~> 4.40"
    }
  }
}

provider "cloudflare" {
  # API token from CLOUDFLARE_API_TOKEN: Load Balancing (account) + DNS (zone) edit.
}

resource "cloudflare_load_balancer_monitor" "gateway_ready" {
  account_id     = var.account_id
  type           = "http"
  method         = "GET"
  path           = "/v2/health/ready"
  port           = var.http_port
  expected_codes = "200"
  interval       = 15
  timeout        = 5
  retries        = 1
  description    = "geogate region gateway can serve (/v2/health/ready)"
}

resource "cloudflare_load_balancer_pool" "region" {
  for_each = var.regions

  account_id = var.account_id
  name       = "geogate-${each.key}"
  monitor    = cloudflare_load_balancer_monitor.gateway_ready.id
  # Probe from the Cloudflare region nearest to the pool, and from one far away.
  check_regions   = each.value.check_regions
  minimum_origins = 1

  origins {
    name    = "gateway-${each.key}"
    address = each.value.address
    enabled = true
  }

  latitude  = each.value.location[0]
  longitude = each.value.location[1]
}

resource "cloudflare_load_balancer" "infer" {
  zone_id = var.zone_id
  name    = var.service_name
  proxied = false
  ttl     = var.ttl

  steering_policy  = "geo"
  default_pool_ids = [for name in var.default_order : cloudflare_load_balancer_pool.region[name].id]
  fallback_pool_id = cloudflare_load_balancer_pool.region[var.default_order[0]].id

  dynamic "region_pools" {
    for_each = var.geo_steering
    content {
      region   = region_pools.key
      pool_ids = [for name in region_pools.value : cloudflare_load_balancer_pool.region[name].id]
    }
  }
}
