"""Seeded synthetic incidents with a labelled root cause: symptoms, log excerpts and a written resolution per cause."""

from __future__ import annotations

import datetime as dt
import random

# cause label → (incident descriptions, symptoms, log lines, resolutions). Slots: {host} {svc} {pct} {n} {ts} {ver}.
CAUSES: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "disk full": (
        ["{svc} stopped writing new records on {host}.", "Batch jobs on {host} fail halfway through.",
         "Uploads to {svc} return server errors."],
        ["writes fail", "log rotation stopped", "the service restarts in a loop"],
        ["{ts} ERROR write failed: No space left on device (/var/lib/{svc})",
         "{ts} WARN filesystem /data is {pct}% full on {host}"],
        ["The /data volume on {host} reached 100% because old logs were never rotated. We deleted {n} GB of "
         "archived logs, enabled logrotate and added a disk usage alert at 85%.",
         "Disk on {host} filled up with temporary export files. Cleaned up the files, moved exports to object "
         "storage and added monitoring on free space."],
    ),
    "expired tls certificate": (
        ["Clients cannot connect to {svc} over HTTPS.", "Partner integrations with {svc} fail since midnight.",
         "Browsers show a security warning on the {svc} portal."],
        ["handshake failures", "certificate warnings in browsers", "API clients refuse to connect"],
        ["{ts} ERROR SSL handshake failed: certificate has expired (notAfter={ts})",
         "{ts} WARN x509: certificate has expired or is not yet valid for {svc}.example.com"],
        ["The TLS certificate for {svc} expired because the renewal job was disabled. We issued a new "
         "certificate, re-enabled automatic renewal and added an expiry alert 30 days ahead.",
         "The {svc} certificate was not renewed after the CA change. Renewed it, deployed to {host} and put all "
         "certificates under automated renewal."],
    ),
    "memory leak": (
        ["{svc} becomes slower during the day and crashes in the evening.",
         "Pods of {svc} are killed repeatedly on {host}.", "{svc} response times grow until a restart."],
        ["rising memory usage", "OOM kills", "latency grows over hours"],
        ["{ts} ERROR java.lang.OutOfMemoryError: Java heap space in {svc}",
         "{ts} kernel: Out of memory: Killed process {n} ({svc})"],
        ["Release {ver} of {svc} kept a reference to every request in a cache without eviction. We rolled back "
         "to the previous release, fixed the cache with a size limit and added a heap usage alert.",
         "A memory leak in {svc} {ver} exhausted the heap on {host}. Restarted the service as a stopgap, "
         "patched the leaking session cache and load-tested before redeploying."],
    ),
    "dns misconfiguration": (
        ["Services cannot reach {svc} by name.", "Intermittent 'host not found' errors for {svc}.",
         "After the network change, {svc} is unreachable from some sites."],
        ["name resolution failures", "works by IP but not by name", "only some clients affected"],
        ["{ts} ERROR getaddrinfo ENOTFOUND {svc}.internal",
                                            "{ts} WARN DNS lookup for {svc}.internal returned NXDOMAIN"],
        ["A DNS record for {svc}.internal was removed during the zone migration. We restored the record, "
         "lowered its TTL and added the zone file to change review.",
         "The new resolver on {host} pointed to a stale zone. Corrected the forwarder configuration and "
         "flushed caches on the affected clients."],
    ),
    "connection pool exhausted": (
        ["{svc} returns timeouts under load.", "{svc} hangs for all users at peak time.",
         "Requests to {svc} queue up and time out after 30 seconds."],
        ["timeouts at peak load", "threads waiting for a database connection", "database itself looks healthy"],
        ["{ts} ERROR HikariPool-1 - Connection is not available, request timed out after 30000ms",
         "{ts} WARN pool exhausted: {n}/{n} connections in use by {svc}"],
        ["The database connection pool of {svc} was capped at {n} connections and a slow query held them. "
         "We added an index for the slow query, raised the pool size and alert on pool saturation.",
         "Connections leaked in an error path of {svc}, so the pool ran dry. Fixed the missing close, "
         "restarted {svc} and added leak detection to the pool settings."],
    ),
    "failed deployment": (
        ["{svc} started returning errors right after the release.", "Half of the requests to {svc} fail since {ts}.",
         "The new version of {svc} does not start on {host}."],
        ["errors began at deployment time", "only new pods are failing", "health checks failing"],
        ["{ts} ERROR missing required config key DATABASE_URL in {svc} {ver}",
         "{ts} WARN readiness probe failed for {svc}-{ver} on {host}"],
        ["Release {ver} of {svc} shipped without a required configuration key. We rolled back to the previous "
         "version, added the key and a config validation step to the pipeline.",
         "The deployment of {svc} {ver} had a broken migration. Rolled back, fixed the migration and made "
         "the pipeline stop on failed readiness checks."],
    ),
    "network switch failure": (
        ["Several servers in rack {n} lost connectivity.", "{svc} and other services on {host} are unreachable.",
         "Packet loss for everything behind one access switch."],
        ["many hosts down at once", "link down events", "packet loss on one segment"],
        ["{ts} %LINK-3-UPDOWN: Interface Gi1/0/{n}, changed state to down",
         "{ts} WARN heartbeat lost from {host} and 11 other nodes"],
        ["The top-of-rack switch in rack {n} failed after a power supply fault. We replaced the switch, "
         "moved the rack to redundant uplinks and verified failover.",
         "A faulty access switch dropped all ports serving {host}. Swapped the hardware and enabled dual "
         "homing for the affected servers."],
    ),
    "expired service account password": (
        ["Scheduled jobs of {svc} fail with authentication errors.",
                             "{svc} cannot read from the file share since today.",
         "Integrations using the {svc} service account stopped."],
        ["authentication failures for one technical account", "interactive users unaffected",
         "started on a fixed date"],
        ["{ts} ERROR LDAP bind failed for svc_{svc}: password expired",
         "{ts} WARN 401 Unauthorized for service account svc_{svc}"],
        ["The password of service account svc_{svc} expired under the 90-day policy. We reset it, stored it in "
         "the vault and exempted technical accounts via a managed identity.",
         "svc_{svc} hit password expiry. Rotated the password through the vault and switched the job to "
         "certificate-based authentication."],
    ),
}
SERVICES = ["billing-api", "orders", "payments", "inventory", "auth", "search", "reporting", "checkout", "crm-sync"]


def generate_incidents(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    start = dt.datetime(2025, 1, 1)
    causes = sorted(CAUSES)
    out = []
    for index in range(n):
        cause = rng.choice(causes)
        descriptions, symptoms, logs, resolutions = CAUSES[cause]
        when = start + dt.timedelta(seconds=rng.randint(0, 365 * 86400))
        slots = {"svc": rng.choice(SERVICES),
                 "host": f"{rng.choice(['app', 'db', 'web', 'k8s-node'])}-{rng.randint(1, 40):02d}",
                 "pct": rng.randint(96, 100), "n": rng.randint(8, 120), "ts": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                 "ver": f"v{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"}
        record = {
            "id": f"RCA{seed}-{index:05d}",
            "title": f"{slots['svc']} incident on {slots['host']}",
            "description": rng.choice(descriptions).format(**slots),
            "cause": cause,
            "resolution": rng.choice(resolutions).format(**slots),
        }
        if rng.random() < 0.7:
            record["symptoms"] = ", ".join(rng.sample(symptoms, k=rng.randint(1, len(symptoms))))
        if rng.random() < 0.6:
            record["logs"] = "\n".join(line.format(**slots) for line in rng.sample(logs, k=rng.randint(1, len(logs))))
        out.append(record)
    return out
