"""`geogate sync`: one site's sync agent (object store -> site model repository -> replicas)."""
