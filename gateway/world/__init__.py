"""`geogate up`: the local world on one machine, its process supervisor, the local
autoscaler and its DNS SRV registry."""
