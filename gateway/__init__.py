"""geogate gateway: the KServe v2 front door, routing, admin API, CLI and local world."""
