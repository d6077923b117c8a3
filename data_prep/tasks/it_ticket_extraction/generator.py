"""Seeded synthetic IT incident tickets (ServiceNow-style): varied phrasings per scenario, CI names, impact and urgency
cues."""

from __future__ import annotations

import datetime as dt
import random

IMPACTS = ("1 - High", "2 - Medium", "3 - Low")
URGENCIES = ("1 - High", "2 - Medium", "3 - Low")
# The ITIL priority matrix: priority follows from impact x urgency.
PRIORITY = {(1, 1): "1 - Critical", (1, 2): "2 - High", (2, 1): "2 - High", (1, 3): "3 - Moderate",
            (2, 2): "3 - Moderate", (3, 1): "3 - Moderate", (2, 3): "4 - Low", (3, 2): "4 - Low",
            (3, 3): "5 - Planning"}

# scenario: category, subcategory, assignment group, affected service, CI name pattern, short descriptions, bodies.
# Slots: {ci} {code} {app} {site} {n} {minutes}.
SCENARIOS: list[dict] = [
    {"category": "network", "subcategory": "vpn", "group": "Network Operations", "service": "Remote Access VPN",
     "ci": "vpn-gw-{site}-0{d}",
     "short": ["VPN keeps disconnecting", "Cannot connect to VPN", "VPN tunnel drops every few minutes",
               "GlobalProtect not connecting"],
     "body": ["The VPN client connects and then drops after {minutes} minutes, gateway {ci}.",
              "Since this morning the VPN login fails with error {code} when using gateway {ci}.",
              "Remote staff report that the tunnel to {ci} times out during authentication.",
              "VPN shows 'connected' but no internal site loads; we are routed through {ci}."]},
    {"category": "network", "subcategory": "wifi", "group": "Network Operations", "service": "Corporate Wi-Fi",
     "ci": "ap-{site}-{floor}f-{d}{d}",
     "short": ["Wi-Fi down on floor {floor}", "No wireless in meeting rooms", "Wi-Fi very slow",
                                     "Cannot join CORP-WLAN"],
     "body": ["Laptops cannot join CORP-WLAN near access point {ci}; the SSID is not even visible.",
              "Wireless keeps dropping in the {site} office, access point {ci} blinks orange.",
              "Wi-Fi speed is below 1 Mbit/s on floor {floor}, the closest AP is {ci}.",
              "Clients get no IP address on the wireless network served by {ci}."]},
    {"category": "software", "subcategory": "email", "group": "Messaging", "service": "Email (Exchange Online)",
     "ci": "EXCH-MBX-0{d}",
     "short": ["Outlook not receiving emails", "Emails stuck in outbox", "Shared mailbox not syncing",
               "Bounce-back {code} on external mail"],
     "body": ["No new mail has arrived in Outlook since {time}; the mailbox is hosted on {ci}.",
              "Messages stay in the outbox and never send; error {code}. Mailbox server {ci}.",
              "The shared mailbox for the {dept} team stopped syncing, database {ci}.",
              "External senders get a bounce with code {code}; trace shows {ci} rejecting them."]},
    {"category": "software", "subcategory": "erp", "group": "SAP Basis", "service": "SAP ERP",
     "ci": "sap-prd-app{d}{d}",
     "short": ["SAP transaction dumps", "Cannot post invoices in SAP", "SAP very slow", "SAP login error {code}"],
     "body": ["Transaction {tcode} ends with a short dump on application server {ci}.",
              "Invoice posting fails with message {code}; users are on instance {ci}.",
              "Every SAP screen takes over {n} seconds to load, application server {ci} looks overloaded.",
              "SAP GUI shows logon error {code} for users routed to {ci}."]},
    {"category": "software", "subcategory": "crm", "group": "CRM Applications", "service": "Salesforce CRM",
     "ci": "sfdc-integration-0{d}",
     "short": ["Leads not syncing to Salesforce", "CRM integration failing", "Salesforce reports empty",
               "Opportunity updates lost"],
     "body": ["New leads from the website have not appeared in Salesforce since {time}; "
              "integration job {ci} errors out.",
              "The nightly sync on {ci} fails with {code} and opportunities are not updated.",
              "Sales dashboards show no data for this week; the feed from {ci} seems stuck.",
              "Updates to accounts are overwritten by the integration user on {ci}."]},
    {"category": "hardware", "subcategory": "laptop", "group": "End User Support", "service": "End User Computing",
     "ci": "LT-{site_upper}-{d}{d}{d}{d}",
     "short": ["Laptop will not boot", "Blue screen on startup", "Laptop battery swollen", "Screen flickering"],
     "body": ["My laptop {ci} shows a blue screen with {code} right after the logo.",
              "Laptop {ci} does not power on even when plugged in, the charging LED stays off.",
              "The battery of {ci} is bulging and the touchpad is lifted, I stopped using it.",
              "The display of {ci} flickers and goes black every few minutes."]},
    {"category": "hardware", "subcategory": "printer", "group": "End User Support", "service": "Print Services",
     "ci": "PRN-{site_upper}-{floor}{d}",
     "short": ["Printer offline", "Print jobs stuck in queue", "Printer jams constantly", "Cannot scan to email"],
     "body": ["Printer {ci} shows offline for everyone on floor {floor}.",
              "Jobs sent to {ci} sit in the queue and never print; restarting the spooler did not help.",
              "{ci} jams on every second page, tray 2.",
              "Scan-to-email on {ci} fails with error {code}."]},
    {"category": "access", "subcategory": "password_reset", "group": "Service Desk", "service": "Active Directory",
     "ci": "AD-DC-{site_upper}-0{d}",
     "short": ["Password reset needed", "Account locked out", "Password expired, cannot change it",
               "Self-service reset not working"],
     "body": ["My account is locked after too many attempts; the lockout comes from domain controller {ci}.",
              "My password expired while on leave and the change screen on {ci} says error {code}.",
              "The self-service password portal fails for me; logs point at {ci}.",
              "I forgot my password and need a reset, the login event is on {ci}."]},
    {"category": "access", "subcategory": "permissions", "group": "Identity and Access Management",
     "service": "File Shares", "ci": "fs-{site}-0{d}",
     "short": ["Access denied on shared drive", "Need access to {dept} folder", "Lost permissions after move",
               "Cannot write to project share"],
     "body": ["I get 'access denied' opening \\\\{ci}\\{dept} although my manager approved it.",
              "Since the department move I can no longer write to the {dept} share on {ci}.",
              "Please grant read/write on the {dept} folder on {ci} to me and two colleagues.",
              "Files on {ci} open read-only for the whole {dept} group since yesterday."]},
    {"category": "database", "subcategory": "performance", "group": "Database Administration",
     "service": "Order Management", "ci": "ora-prd-db{d}{d}",
     "short": ["Order screen very slow", "Database queries timing out", "Reports take forever",
               "High CPU on database"],
     "body": ["Order entry takes {n} seconds per save; AWR shows long waits on {ci}.",
              "Queries against {ci} time out after {minutes} minutes, blocking the order batch.",
              "Month-end reports on {ci} have been running for hours instead of minutes.",
              "CPU on database server {ci} sits at 100% and the order screens freeze."]},
    {"category": "database", "subcategory": "outage", "group": "Database Administration",
     "service": "Payroll", "ci": "pg-payroll-0{d}",
     "short": ["Payroll system down", "Database connection refused", "Payroll app error {code}",
               "Cannot open payroll"],
     "body": ["The payroll application shows 'connection refused' to database {ci}.",
              "Payroll fails with {code}; database {ci} is not accepting connections.",
              "Nobody can open payroll since {time}, the DB host {ci} does not answer.",
              "The payroll run aborted because {ci} went down mid-batch."]},
    {"category": "software", "subcategory": "collaboration", "group": "Messaging", "service": "Microsoft Teams",
     "ci": "teams-tenant-{site}",
     "short": ["Teams calls dropping", "Cannot join Teams meetings", "Teams chat not loading",
               "No audio in Teams"],
     "body": ["Teams calls drop after {minutes} minutes for users on tenant {ci}.",
              "Joining meetings fails with error {code}; the {site} office is on {ci}.",
              "Teams chat shows a spinner forever, tenant {ci}.",
              "Nobody hears me in Teams calls, device settings look fine; tenant {ci}."]},
]

SITES = ["fra", "lon", "nyc", "sgp", "ber", "par", "mad", "tor"]
DEPTS = ["Finance", "HR", "Sales", "Legal", "Marketing", "Procurement", "Logistics", "Engineering"]
TCODES = ["FB60", "ME21N", "VA01", "MIGO", "F110", "CO01"]
FIRST = ["Anna", "Ben", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kavya", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Rosa", "Samir", "Tara", "Vera", "Wen", "Yusuf", "Zoe"]
LAST = ["Schmidt", "Okafor", "Rossi", "Novak", "Garcia", "Tanaka", "Nguyen", "Larsen", "Haddad", "Dubois",
        "Kowalski", "Silva", "Murphy", "Ivanova", "Chen", "Patel"]

IMPACT_CUES = {
    1: ["All users company-wide are affected.", "Every site reports the same problem.",
        "This hits all customers and the whole {dept} department.", "Around {big} users cannot work."],
    2: ["The whole {dept} team ({n} people) is affected.", "Several colleagues in {dept} have the same issue.",
        "About {n} users on floor {floor} are impacted.", "It affects our department only."],
    3: ["Only I am affected.", "Just my machine, colleagues are fine.", "It is only me as far as I know.",
        "Single user issue."],
}
URGENCY_CUES = {
    1: ["We cannot work at all, please fix immediately.", "Business critical, revenue is at stake right now.",
        "Urgent: deadline in two hours.", "Production is stopped."],
    2: ["We have a slow workaround for today.", "Please look at it today if possible.",
        "It is disruptive but we can wait a few hours."],
    3: ["No rush, whenever you can.", "Low urgency, there is a workaround.", "Can wait until next week."],
}
OPENERS = ["Hi team,", "Hello,", "Dear Service Desk,", "Hi,", "", "Good morning,", "Hey IT,"]
CLOSERS = ["Thanks,\n{first}", "Regards, {first} {last}", "", "Cheers, {first}", "Thank you."]


def generate_incidents(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    start = dt.datetime(2025, 1, 1, 8, 0)
    incidents = []
    for index in range(n):
        scenario = rng.choice(SCENARIOS)
        impact, urgency = rng.randint(1, 3), rng.randint(1, 3)
        site = rng.choice(SITES)
        first, last = rng.choice(FIRST), rng.choice(LAST)
        opened = start + dt.timedelta(minutes=rng.randint(0, 365 * 24 * 60))
        slots = {
            "site": site, "site_upper": site.upper(), "floor": rng.randint(1, 9), "code": _code(rng),
            "n": rng.randint(5, 60), "big": rng.choice([300, 800, 1500, 4000]), "minutes": rng.randint(2, 45),
            "dept": rng.choice(DEPTS), "tcode": rng.choice(TCODES),
            "time": (opened - dt.timedelta(hours=rng.randint(1, 6))).strftime("%H:%M"),
        }
        ci = "".join(str(rng.randint(0, 9)) if part == "{d}" else part
                     for part in _split_digits(scenario["ci"])).format(**slots)
        slots["ci"] = ci
        body = rng.choice(scenario["body"]).format(**slots)
        cues = [rng.choice(IMPACT_CUES[impact]).format(**slots), rng.choice(URGENCY_CUES[urgency])]
        rng.shuffle(cues)
        parts = [rng.choice(OPENERS), body, *cues, rng.choice(CLOSERS).format(first=first, last=last)]
        incidents.append({
            "number": f"INC{seed % 100:02d}{index:05d}",
            "short_description": rng.choice(scenario["short"]).format(**slots),
            "description": "\n".join(part for part in parts if part),
            "caller": f"{first} {last}",
            "opened_at": opened.strftime("%Y-%m-%d %H:%M:%S"),
            "category": scenario["category"],
            "subcategory": scenario["subcategory"],
            "assignment_group": scenario["group"],
            "priority": PRIORITY[(impact, urgency)],
            "impact": IMPACTS[impact - 1],
            "affected_service": scenario["service"],
            "configuration_item": ci,
        })
    return incidents


def _code(rng: random.Random) -> str:
    return rng.choice([f"0x{rng.randint(0, 2**32 - 1):08X}", f"ERR-{rng.randint(100, 999)}",
                       f"5.{rng.randint(1, 7)}.{rng.randint(0, 9)}", f"E{rng.randint(1000, 9999)}"])


def _split_digits(pattern: str) -> list[str]:
    """'ap-{site}-{d}{d}' → ['ap-{site}-', '{d}', '{d}']: each {d} becomes one random digit."""
    pieces = pattern.split("{d}")
    out: list[str] = []
    for i, piece in enumerate(pieces):
        out.append(piece)
        if i < len(pieces) - 1:
            out.append("{d}")
    return out
