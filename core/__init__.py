"""geogate core: what every part shares (config schema and loader, TLS contexts, name rules,
KServe v2 constants, logging, file watching, DNS SRV discovery). Imports nothing in-project."""
