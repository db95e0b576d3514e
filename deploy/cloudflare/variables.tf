variable "account_id" {
  description = "Cloudflare account that owns the monitors and pools"
  type        = string
}

variable "zone_id" {
  description = "Cloudflare zone of the service name"
  type        = string
}

variable "service_name" {
  description = "The name clients resolve"
  type        = string
  default     = "infer.geogate.example.com"
}

variable "ttl" {
  description = "DNS TTL of the load balancer's answers, seconds"
  type        = number
  default     = 30
}

variable "http_port" {
  description = "The gateways' client HTTP port, where /v2/health/ready is served"
  type        = number
  default     = 8000
}

# One entry per [[regions]] of the geogate config (deploy/k8s/base/geogate.toml):
# address = the region's `addresses`, location = its `location`.
variable "regions" {
  description = "geogate regions: gateway address, location, Cloudflare monitor regions"
  type = map(object({
    address       = string
    location      = list(number)
    check_regions = list(string)
  }))
  default = {
    "eu-west" = {
      address       = "203.0.113.10"
      location      = [53.35, -6.26]
      check_regions = ["WEU", "ENAM"]
    }
    "us-east" = {
      address       = "203.0.113.20"
      location      = [38.9, -77.0]
      check_regions = ["ENAM", "WEU"]
    }
    "ap-south" = {
      address       = "203.0.113.30"
      location      = [19.08, 72.88]
      check_regions = ["SAS", "SEAS"]
    }
  }
}

# Cloudflare geographic region code -> geogate regions in order of preference. A pool that
# fails its monitor is skipped; the next one in the list answers.
variable "geo_steering" {
  description = "Cloudflare region code -> ordered geogate regions"
  type        = map(list(string))
  default = {
    "WEU"  = ["eu-west", "us-east", "ap-south"]
    "EEU"  = ["eu-west", "ap-south", "us-east"]
    "ENAM" = ["us-east", "eu-west", "ap-south"]
    "WNAM" = ["us-east", "eu-west", "ap-south"]
    "SAM"  = ["us-east", "eu-west", "ap-south"]
    "NAF"  = ["eu-west", "us-east", "ap-south"]
    "SAF"  = ["eu-west", "ap-south", "us-east"]
    "ME"   = ["ap-south", "eu-west", "us-east"]
    "SAS"  = ["ap-south", "eu-west", "us-east"]
    "SEAS" = ["ap-south", "us-east", "eu-west"]
    "NEAS" = ["ap-south", "us-east", "eu-west"]
    "OC"   = ["ap-south", "us-east", "eu-west"]
  }
}

variable "default_order" {
  description = "Pools for clients of no listed region, in order of preference"
  type        = list(string)
  default     = ["eu-west", "us-east", "ap-south"]
}
