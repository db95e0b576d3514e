variable "zone_id" {
  description = "Route 53 hosted zone that holds the service names"
  type        = string
}

variable "service_name" {
  description = "The name clients resolve (latency-based, health-checked)"
  type        = string
  default     = "infer.geogate.example.com"
}

variable "failover_name" {
  description = "A name with primary/secondary failover instead of latency routing"
  type        = string
  default     = "infer-failover.geogate.example.com"
}

variable "ttl" {
  description = "Record TTL in seconds (short: failover is as fast as resolvers re-ask)"
  type        = number
  default     = 20
}

variable "http_port" {
  description = "The gateways' client HTTP port, where /v2/health/ready is served"
  type        = number
  default     = 8000
}

# One entry per [[regions]] of the geogate config (deploy/k8s/base/geogate.toml): address is
# the region's `addresses` (its gateway load balancer), aws_region the closest AWS region
# for latency measurements.
variable "regions" {
  description = "geogate regions: gateway address and the AWS region nearest to it"
  type = map(object({
    address    = string
    aws_region = string
  }))
  default = {
    "eu-west" = {
      address    = "203.0.113.10"
      aws_region = "eu-west-1"
    }
    "us-east" = {
      address    = "203.0.113.20"
      aws_region = "us-east-1"
    }
    "ap-south" = {
      address    = "203.0.113.30"
      aws_region = "ap-south-1"
    }
  }
}

variable "failover_primary" {
  description = "Region answered for failover_name while healthy"
  type        = string
  default     = "eu-west"
}

variable "failover_secondary" {
  description = "Region answered for failover_name when the primary is unhealthy"
  type        = string
  default     = "us-east"
}
