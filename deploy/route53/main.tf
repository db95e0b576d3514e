# Route 53 in front of geogate's regions: one health check per region gateway on
# /v2/health/ready (200 only when that region can serve), latency-based records for the
# service name (each answer withdrawn while its region is unhealthy), and a failover pair
# for clients that should stick to one primary region.
#
#   cd deploy/route53 && terraform init && terraform plan -var zone_id=Z123...
#
# Route 53 health checkers probe from the internet: each region gateway's client HTTP port
# (8000) must be reachable from Route 53's health-checker ranges (AWS ip-ranges.json,
# service ROUTE53_HEALTHCHECKS).

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  region = "us-east-1" # Route 53 is global; health checks and records are created here.
}

resource "aws_route53_health_check" "region" {
  for_each = var.regions

  ip_address        = each.value.address
  port              = var.http_port
  type              = "HTTP"
  resource_path     = "/v2/health/ready"
  request_interval  = 10
  failure_threshold = 2
  measure_latency   = true
  # Each checker region must agree; Route 53 counts the region unhealthy when fewer than
  # 18% of its checkers see 200.
  regions = ["us-east-1", "eu-west-1", "ap-southeast-1"]

  tags = {
    Name           = "geogate-${each.key}"
    geogate-region = each.key
  }
}

# Latency-based: each client gets the region with the lowest measured latency among the
# HEALTHY ones. geogate's own GeoDNS does the same job with great-circle distance; use one
# or the other for the service name.
resource "aws_route53_record" "latency" {
  for_each = var.regions

  zone_id         = var.zone_id
  name            = var.service_name
  type            = "A"
  ttl             = var.ttl
  records         = [each.value.address]
  set_identifier  = "geogate-${each.key}"
  health_check_id = aws_route53_health_check.region[each.key].id

  latency_routing_policy {
    region = each.value.aws_region
  }
}

# Failover: PRIMARY while its health check passes, else SECONDARY. The gateways fail over
# between regions themselves too; this covers clients whose primary region is down entirely.
resource "aws_route53_record" "failover_primary" {
  zone_id         = var.zone_id
  name            = var.failover_name
  type            = "A"
  ttl             = var.ttl
  records         = [var.regions[var.failover_primary].address]
  set_identifier  = "geogate-primary-${var.failover_primary}"
  health_check_id = aws_route53_health_check.region[var.failover_primary].id

  failover_routing_policy {
    type = "PRIMARY"
  }
}

resource "aws_route53_record" "failover_secondary" {
  zone_id         = var.zone_id
  name            = var.failover_name
  type            = "A"
  ttl             = var.ttl
  records         = [var.regions[var.failover_secondary].address]
  set_identifier  = "geogate-secondary-${var.failover_secondary}"
  health_check_id = aws_route53_health_check.region[var.failover_secondary].id

  failover_routing_policy {
    type = "SECONDARY"
  }
}

output "health_check_ids" {
  description = "Route 53 health check per geogate region"
  value       = { for name, hc in aws_route53_health_check.region : name => hc.id }
}
