"""The simulated planet: cloud regions at real cities, client metros, replicas, and a deployment
config the product's code reads like any other.

Regions are the world's major cloud regions (AWS/GCP/Azure locations, by city); the first N of
``REGIONS`` are used, ordered so that any prefix is spread over the continents. Clients live in
``METROS`` (the largest metropolitan areas and the main internet hubs), weighted by population
(millions, rounded UN/World Population Review figures) and following their own time zone.

Replicas are heterogeneous: a hardware class (parallel slots, base service time) plus a
per-replica speed spread. Replicas are placed in proportion to each region's peak demand
(``replicas_per_region`` on average, ``MIN_REPLICAS_PER_REGION`` at least), the way a buyer sizes
a fleet, and the real request rate is scaled so the busiest region peaks at ``peak_utilization``
of its capacity: a region's loss then has to be absorbed by neighbours that have headroom, but
not unlimited headroom.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import zoneinfo
from dataclasses import dataclass, field

from core.config import Config, parse_config
from geo.distance import great_circle_km
from loadtests.sim import traffic

# name, city, latitude, longitude, IANA time zone, continent
REGIONS: tuple[tuple[str, str, float, float, str, str], ...] = (
    ("us-east-1", "Ashburn", 39.04, -77.49, "America/New_York", "NA"),
    ("eu-west-1", "Dublin", 53.35, -6.26, "Europe/Dublin", "EU"),
    ("ap-northeast-1", "Tokyo", 35.68, 139.69, "Asia/Tokyo", "AS"),
    ("ap-south-1", "Mumbai", 19.08, 72.88, "Asia/Kolkata", "AS"),
    ("sa-east-1", "Sao Paulo", -23.55, -46.63, "America/Sao_Paulo", "SA"),
    ("ap-southeast-2", "Sydney", -33.87, 151.21, "Australia/Sydney", "OC"),
    ("us-west-2", "Boardman", 45.84, -119.70, "America/Los_Angeles", "NA"),
    ("eu-central-1", "Frankfurt", 50.11, 8.68, "Europe/Berlin", "EU"),
    ("ap-southeast-1", "Singapore", 1.35, 103.82, "Asia/Singapore", "AS"),
    ("af-south-1", "Cape Town", -33.92, 18.42, "Africa/Johannesburg", "AF"),
    ("me-central-1", "Dubai", 25.20, 55.27, "Asia/Dubai", "AS"),
    ("ap-northeast-2", "Seoul", 37.57, 126.98, "Asia/Seoul", "AS"),
    ("us-central-1", "Council Bluffs", 41.26, -95.86, "America/Chicago", "NA"),
    ("eu-west-3", "Paris", 48.86, 2.35, "Europe/Paris", "EU"),
    ("ap-east-1", "Hong Kong", 22.32, 114.17, "Asia/Hong_Kong", "AS"),
    ("us-west-1", "San Jose", 37.34, -121.89, "America/Los_Angeles", "NA"),
    ("ca-central-1", "Montreal", 45.50, -73.57, "America/Toronto", "NA"),
    ("eu-north-1", "Stockholm", 59.33, 18.07, "Europe/Stockholm", "EU"),
    ("ap-southeast-3", "Jakarta", -6.21, 106.85, "Asia/Jakarta", "AS"),
    ("eu-west-2", "London", 51.51, -0.13, "Europe/London", "EU"),
    ("mx-central-1", "Queretaro", 20.59, -100.39, "America/Mexico_City", "NA"),
    ("ap-south-2", "Hyderabad", 17.39, 78.49, "Asia/Kolkata", "AS"),
    ("eu-south-1", "Milan", 45.46, 9.19, "Europe/Rome", "EU"),
    ("ap-northeast-3", "Osaka", 34.69, 135.50, "Asia/Tokyo", "AS"),
    ("us-south-1", "Dallas", 32.78, -96.80, "America/Chicago", "NA"),
    ("sa-west-1", "Santiago", -33.45, -70.67, "America/Santiago", "SA"),
    ("il-central-1", "Tel Aviv", 32.08, 34.78, "Asia/Jerusalem", "AS"),
    ("eu-south-2", "Madrid", 40.42, -3.70, "Europe/Madrid", "EU"),
    ("ap-southeast-4", "Melbourne", -37.81, 144.96, "Australia/Melbourne", "OC"),
    ("us-east-2", "Columbus", 39.96, -83.00, "America/New_York", "NA"),
)

# name, latitude, longitude, IANA time zone, population (millions), continent
METROS: tuple[tuple[str, float, float, str, float, str], ...] = (
    ("Tokyo", 35.68, 139.69, "Asia/Tokyo", 37.2, "AS"),
    ("Delhi", 28.61, 77.21, "Asia/Kolkata", 33.0, "AS"),
    ("Shanghai", 31.23, 121.47, "Asia/Shanghai", 29.2, "AS"),
    ("Dhaka", 23.81, 90.41, "Asia/Dhaka", 23.2, "AS"),
    ("Sao Paulo", -23.55, -46.63, "America/Sao_Paulo", 22.6, "SA"),
    ("Cairo", 30.04, 31.24, "Africa/Cairo", 22.2, "AF"),
    ("Mexico City", 19.43, -99.13, "America/Mexico_City", 22.3, "NA"),
    ("Beijing", 39.90, 116.41, "Asia/Shanghai", 21.8, "AS"),
    ("Mumbai", 19.08, 72.88, "Asia/Kolkata", 21.3, "AS"),
    ("Osaka", 34.69, 135.50, "Asia/Tokyo", 19.0, "AS"),
    ("New York", 40.71, -74.01, "America/New_York", 18.9, "NA"),
    ("Karachi", 24.86, 67.00, "Asia/Karachi", 17.6, "AS"),
    ("Istanbul", 41.01, 28.98, "Europe/Istanbul", 15.8, "EU"),
    ("Lagos", 6.52, 3.38, "Africa/Lagos", 15.9, "AF"),
    ("Buenos Aires", -34.60, -58.38, "America/Argentina/Buenos_Aires", 15.5, "SA"),
    ("Kolkata", 22.57, 88.36, "Asia/Kolkata", 15.3, "AS"),
    ("Manila", 14.60, 120.98, "Asia/Manila", 14.9, "AS"),
    ("Guangzhou", 23.13, 113.26, "Asia/Shanghai", 14.3, "AS"),
    ("Kinshasa", -4.44, 15.27, "Africa/Kinshasa", 16.3, "AF"),
    ("Lahore", 31.55, 74.34, "Asia/Karachi", 14.0, "AS"),
    ("Rio de Janeiro", -22.91, -43.17, "America/Sao_Paulo", 13.7, "SA"),
    ("Bangalore", 12.97, 77.59, "Asia/Kolkata", 13.6, "AS"),
    ("Shenzhen", 22.54, 114.06, "Asia/Shanghai", 13.1, "AS"),
    ("Moscow", 55.76, 37.62, "Europe/Moscow", 12.7, "EU"),
    ("Los Angeles", 34.05, -118.24, "America/Los_Angeles", 12.5, "NA"),
    ("Chennai", 13.08, 80.27, "Asia/Kolkata", 11.8, "AS"),
    ("Lima", -12.05, -77.04, "America/Lima", 11.2, "SA"),
    ("Bogota", 4.71, -74.07, "America/Bogota", 11.5, "SA"),
    ("Paris", 48.86, 2.35, "Europe/Paris", 11.2, "EU"),
    ("Jakarta", -6.21, 106.85, "Asia/Jakarta", 11.2, "AS"),
    ("Bangkok", 13.76, 100.50, "Asia/Bangkok", 11.0, "AS"),
    ("Hyderabad", 17.39, 78.49, "Asia/Kolkata", 10.8, "AS"),
    ("Seoul", 37.57, 126.98, "Asia/Seoul", 10.0, "AS"),
    ("London", 51.51, -0.13, "Europe/London", 9.7, "EU"),
    ("Tehran", 35.69, 51.39, "Asia/Tehran", 9.5, "AS"),
    ("Ho Chi Minh City", 10.82, 106.63, "Asia/Ho_Chi_Minh", 9.3, "AS"),
    ("Chicago", 41.88, -87.63, "America/Chicago", 8.9, "NA"),
    ("Riyadh", 24.71, 46.68, "Asia/Riyadh", 7.7, "AS"),
    ("Hong Kong", 22.32, 114.17, "Asia/Hong_Kong", 7.6, "AS"),
    ("Dallas", 32.78, -96.80, "America/Chicago", 7.9, "NA"),
    ("Taipei", 25.03, 121.57, "Asia/Taipei", 7.0, "AS"),
    ("Santiago", -33.45, -70.67, "America/Santiago", 6.9, "SA"),
    ("Madrid", 40.42, -3.70, "Europe/Madrid", 6.8, "EU"),
    ("Toronto", 43.65, -79.38, "America/Toronto", 6.4, "NA"),
    ("Washington", 38.91, -77.04, "America/New_York", 6.4, "NA"),
    ("Miami", 25.76, -80.19, "America/New_York", 6.2, "NA"),
    ("Atlanta", 33.75, -84.39, "America/New_York", 6.3, "NA"),
    ("Singapore", 1.35, 103.82, "Asia/Singapore", 6.0, "AS"),
    ("Johannesburg", -26.20, 28.05, "Africa/Johannesburg", 6.2, "AF"),
    ("Nairobi", -1.29, 36.82, "Africa/Nairobi", 5.3, "AF"),
    ("Sydney", -33.87, 151.21, "Australia/Sydney", 5.4, "OC"),
    ("Melbourne", -37.81, 144.96, "Australia/Melbourne", 5.2, "OC"),
    ("San Francisco", 37.77, -122.42, "America/Los_Angeles", 4.7, "NA"),
    ("Cape Town", -33.92, 18.42, "Africa/Johannesburg", 4.9, "AF"),
    ("Montreal", 45.50, -73.57, "America/Toronto", 4.3, "NA"),
    ("Tel Aviv", 32.08, 34.78, "Asia/Jerusalem", 4.2, "AS"),
    ("Seattle", 47.61, -122.33, "America/Los_Angeles", 4.1, "NA"),
    ("Berlin", 52.52, 13.40, "Europe/Berlin", 3.6, "EU"),
    ("Dubai", 25.20, 55.27, "Asia/Dubai", 3.6, "AS"),
    ("Milan", 45.46, 9.19, "Europe/Rome", 3.1, "EU"),
    ("Frankfurt", 50.11, 8.68, "Europe/Berlin", 2.3, "EU"),
    ("Stockholm", 59.33, 18.07, "Europe/Stockholm", 1.7, "EU"),
    ("Auckland", -36.85, 174.76, "Pacific/Auckland", 1.7, "OC"),
    ("Dublin", 53.35, -6.26, "Europe/Dublin", 1.5, "EU"),
)

# hardware class: (name, parallel slots, base service time in seconds, share of the fleet)
REPLICA_CLASSES: tuple[tuple[str, int, float, float], ...] = (
    ("large", 16, 0.030, 0.25),
    ("medium", 8, 0.040, 0.50),
    ("small", 4, 0.060, 0.25),
)
SPEED_SPREAD_SIGMA = 0.15  # per-replica lognormal spread of the service time within a class
MIN_REPLICAS_PER_REGION = 2
DEFAULT_PEAK_UTILIZATION = 0.6  # the busiest region's peak demand over its capacity
SIZING_STEP_S = 900.0  # demand curves are sampled this often when sizing the fleet
DAY_S = 86400.0
# The simulated day: a Wednesday in June (northern summer time), from 00:00 UTC.
DAY_START_UTC = dt.datetime(2025, 6, 18, tzinfo=dt.UTC)
MODEL = "demo"
REPLICA_PORT = 8001


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    city: str
    lat: float
    lon: float
    tz: str
    continent: str
    index: int

    @property
    def location(self) -> tuple[float, float]:
        return self.lat, self.lon


@dataclass(frozen=True, slots=True)
class Metro:
    name: str
    lat: float
    lon: float
    tz: str
    population_m: float
    continent: str
    utc_offset_h: float  # on the simulated day
    cidr: str  # the client network GeoDNS sees for it

    @property
    def location(self) -> tuple[float, float]:
        return self.lat, self.lon


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    url: str
    region: str
    hw: str
    slots: int
    service_s: float  # mean service time of one request, unqueued

    @property
    def capacity_per_s(self) -> float:
        return self.slots / self.service_s


@dataclass
class World:
    regions: list[Region]
    metros: list[Metro]
    replicas: dict[str, list[ReplicaSpec]]  # region -> its replicas
    nearest: dict[str, str]  # metro -> nearest region (great-circle)
    demand_scale: float  # real requests/s per (million people x diurnal factor)
    peak_demand_per_s: dict[str, float]  # region -> its peak demand (nearest-region assignment)
    config: Config
    config_text: str = field(repr=False)

    @property
    def total_replicas(self) -> int:
        return sum(len(v) for v in self.replicas.values())

    def region(self, name: str) -> Region:
        return self.regions[self._index[name]]

    def __post_init__(self) -> None:
        self._index = {r.name: i for i, r in enumerate(self.regions)}
        self.by_continent: dict[str, list[str]] = {}
        for r in self.regions:
            self.by_continent.setdefault(r.continent, []).append(r.name)

    def capacity_per_s(self, region: str) -> float:
        return sum(s.capacity_per_s for s in self.replicas[region])

    def metro_rate_per_s(self, metro: Metro, t_s: float) -> float:
        """Real requests per second from `metro` at `t_s` (seconds since the day's start)."""
        hour = traffic.local_hour(t_s, metro.utc_offset_h)
        return self.demand_scale * metro.population_m * traffic.diurnal_factor(hour)


def utc_offset_h(tz: str, when: dt.datetime = DAY_START_UTC) -> float:
    off = when.astimezone(zoneinfo.ZoneInfo(tz)).utcoffset()
    return off.total_seconds() / 3600.0 if off is not None else 0.0


def _nearest(loc: tuple[float, float], regions: list[Region]) -> str:
    return min(regions, key=lambda r: great_circle_km(loc, r.location)).name


def _replica_url(region_index: int, i: int) -> str:
    return f"grpc://10.{region_index}.{i // 250}.{i % 250 + 1}:{REPLICA_PORT}"


def _config_text(regions: list[Region], replicas: dict[str, list[ReplicaSpec]], mode: str) -> str:
    lines = ['[deployment]', 'name = "sim"', '[routing]', f'mode = "{mode}"', '']
    for r in regions:
        i = r.index
        lines += ['[[regions]]', f'name = "{r.name}"', f'location = [{r.lat}, {r.lon}]',
                  f'http = "100.64.{i}.1:8000"', f'grpc = "100.64.{i}.1:8001"', f'admin = "100.64.{i}.1:8002"',
                  f'addresses = ["100.64.{i}.1"]', '', '  [[regions.pools]]', f'  name = "{r.name}-pool"',
                  '  kind = "geogate"',
                  '  replicas = [' + ", ".join(f'"{s.url}"' for s in replicas[r.name]) + ']', '']
    return "\n".join(lines)


def build_world(*, regions: int = 24, replicas_per_region: float = 42.0, seed: int = 1,
                peak_utilization: float = DEFAULT_PEAK_UTILIZATION, mode: str = "local-first") -> World:
    """The planet: the first `regions` of REGIONS, every metro, about `replicas_per_region`
    replicas per region placed by peak demand, demand scaled to `peak_utilization`."""
    if not 2 <= regions <= len(REGIONS):
        raise ValueError(f"--regions must be between 2 and {len(REGIONS)}, got {regions}")
    if replicas_per_region < MIN_REPLICAS_PER_REGION:
        raise ValueError(f"--replicas-per-region must be at least {MIN_REPLICAS_PER_REGION}, got {replicas_per_region}")
    if not 0.0 < peak_utilization < 1.0:
        raise ValueError(f"peak utilization must be in (0, 1), got {peak_utilization}")
    rng = random.Random(seed)
    regs = [Region(n, c, lat, lon, tz, cont, i) for i, (n, c, lat, lon, tz, cont) in enumerate(REGIONS[:regions])]
    metros = [Metro(n, lat, lon, tz, pop, cont, utc_offset_h(tz), f"172.{16 + k // 256}.{k % 256}.0/24")
              for k, (n, lat, lon, tz, pop, cont) in enumerate(METROS)]
    nearest = {m.name: _nearest(m.location, regs) for m in metros}

    # Relative demand per region over the day (people x diurnal factor), nearest-region assignment.
    steps = int(DAY_S / SIZING_STEP_S)
    curve = {r.name: [0.0] * steps for r in regs}
    for m in metros:
        c = curve[nearest[m.name]]
        for k in range(steps):
            c[k] += m.population_m * traffic.diurnal_factor(traffic.local_hour(k * SIZING_STEP_S, m.utc_offset_h))
    peak_rel = {name: max(c) for name, c in curve.items()}
    total_peak = sum(peak_rel.values())
    total_replicas = round(replicas_per_region * regions)
    counts = {name: max(MIN_REPLICAS_PER_REGION, round(total_replicas * p / total_peak))
              for name, p in peak_rel.items()}

    classes = [(name, slots, svc) for name, slots, svc, _ in REPLICA_CLASSES]
    weights = [share for *_, share in REPLICA_CLASSES]
    replicas: dict[str, list[ReplicaSpec]] = {}
    for r in regs:
        specs = []
        for i in range(counts[r.name]):
            hw, slots, svc = rng.choices(classes, weights)[0]
            service_s = svc * math.exp(rng.gauss(0.0, SPEED_SPREAD_SIGMA))
            specs.append(ReplicaSpec(_replica_url(r.index, i), r.name, hw, slots, service_s))
        replicas[r.name] = specs

    # Scale: the region closest to its capacity at its own peak sits at peak_utilization.
    ratio = min(sum(s.capacity_per_s for s in replicas[name]) / p for name, p in peak_rel.items() if p > 0)
    demand_scale = peak_utilization * ratio
    text = _config_text(regs, replicas, mode)
    return World(regs, metros, replicas, nearest, demand_scale,
                 {name: demand_scale * p for name, p in peak_rel.items()}, parse_config(text, source="<sim>"), text)
