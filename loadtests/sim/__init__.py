"""Planet-scale simulation: the product's routing and health code driving a fleet of regions and
replicas on a simulated clock (no sleeping, no sockets). ``geogate bench sim`` runs it.

One job per module:

    world      regions at real cloud-region cities, client metros with population weights and
               time zones, replicas with heterogeneous speeds, capacity sized to demand
    network    round trips from great-circle distance (fibre at ~2/3 c plus a per-hop cost),
               dead regions and partitions between continents
    traffic    diurnal demand by each metro's local time, priority-class mix
    queueing   each replica as an M/M/c queue with a fluid backlog when overloaded
    faults     the timeline: replicas failing and recovering, a slow replica, the busiest region
               lost at its peak hour and restored, a partition between two continents
    gateway    one region's gateway composed from the product's own objects (pools, router,
               region monitor, capacity tracker, admission, retry budget) on the simulated clock
    requests   one sampled request through those objects (the forwarder's control flow)
    driver     the event loop: probes, faults, ticks, sampled requests, load picks
    metrics    what the run measured, aggregated into sim.json
    cost       the per-request decision cost at fleet sizes 10 .. 10,000
    report     sim.png
    run        options -> world -> driver -> outputs
"""
