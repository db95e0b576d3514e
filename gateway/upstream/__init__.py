"""How a request reaches a replica or a peer gateway: replica pools, HTTP and gRPC clients,
protocol translation, the model catalog and replicas' load signals."""
