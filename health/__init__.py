"""geogate health: active checks, passive outlier detection, region health aggregation."""
