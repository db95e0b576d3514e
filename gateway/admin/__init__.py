"""The operators' side of a gateway: admin API for model versions, status page and its UI,
region summary, `geogate status`."""
