"""`geogate sync`: one site's sync agent (object store -> site model repository -> replicas).

agent: the round loop and its lifecycle; installer: fetch, stage, verify and commit a version
atomically (and remove one); replica_client / replica_control: the replicas' repository API
over HTTP and gRPC (TLS and control tokens included), load, wait ready, unload; retirement: when
old versions may go; status / metrics: site status publication, store health, Prometheus;
state: what the agent knows; cli: the command line.
"""
