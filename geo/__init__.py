"""geogate geo: locations, client geolocation, region ordering, GeoDNS, SRV discovery."""
