"""Model versions across sites: manifests and signatures, release records, per-site status,
the version/cutover resolver, and `geogate models`."""
