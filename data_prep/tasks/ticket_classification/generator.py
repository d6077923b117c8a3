"""Seeded synthetic support tickets: varied phrasings per (category, subcategory), urgency cues, names,
dates, products."""

from __future__ import annotations

import datetime as dt
import random

TAXONOMY: dict[str, tuple[str, ...]] = {
    "billing": ("refund", "invoice"),
    "account": ("login", "permissions"),
    "technical": ("bug", "performance"),
    "shipping": ("delay", "damaged"),
    "product": ("feature_request", "compatibility"),
    "unrelated": ("none",),
}
URGENCIES = ("high", "medium", "low")

PRODUCTS = ["Nimbus Router X2", "FlowDesk Pro", "Atlas Smart Scale", "PixelNote tablet", "Orbit headset",
            "CloudVault plan", "Vector standing desk", "Beacon camera", "Quill e-reader", "Harbor NAS 4-bay"]
FIRST = ["Anna", "Ben", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kavya", "Liam",
         "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Ugo", "Vera", "Wen", "Yusuf", "Zoe"]
LAST = ["Schmidt", "Okafor", "Rossi", "Novak", "Garcia", "Tanaka", "Nguyen", "Larsen", "Haddad", "Dubois",
        "Kowalski", "Silva", "Murphy", "Ivanova", "Chen", "Patel"]
OPENERS = ["Hi,", "Hello support,", "Dear team,", "Hey there,", "Good morning,", "Hi all,", "",
           "To whom it may concern,"]
CLOSERS = ["Thanks, {first}", "Regards,\n{first} {last}", "Best, {first}", "Cheers", "", "Thank you in advance.",
           "Kind regards, {first} {last}"]

# Each entry: (title templates, body templates). Slots: {product} {order} {amount} {code} {days} {feature} {system}.
CONTENT: dict[tuple[str, str], tuple[list[str], list[str]]] = {
    ("billing", "refund"): (
        ["Refund request for order {order}", "Money back for {product}?", "Still waiting on my refund",
         "Please refund duplicate payment"],
        ["I returned the {product} {days} days ago and the refund of ${amount} has not reached my account.",
         "I was charged twice for order {order} (${amount} each). Please send back the duplicate payment.",
         "I cancelled my {product} subscription within the trial but you still took ${amount}. I want my money back.",
         "The return label for order {order} was scanned last week. When will the ${amount} be credited back?"],
    ),
    ("billing", "invoice"): (
        ["Wrong VAT on invoice", "Invoice for order {order}", "Need a corrected invoice", "Missing invoice PDF"],
        ["The invoice for order {order} shows the wrong company address and VAT number. Please issue a corrected one.",
         "Our accounting needs an invoice for the ${amount} charge on the {product}, but the download link is broken.",
         "The invoice total says ${amount} but the quote we accepted was lower. Can you check the line items?",
         "Could you re-send invoice {code}? It never arrived in our billing inbox."],
    ),
    ("account", "login"): (
        ["Cannot log in", "Locked out of my account", "2FA code never arrives", "Login loop on the portal"],
        ["Every time I enter my password the portal sends me back to the sign-in page. Cleared cookies already.",
         "My account got locked after three attempts and the unlock email never came.",
         "The two-factor code SMS is not arriving, so I cannot sign in to {product} at all.",
         "Sign-in fails with error {code} since this morning, both on the app and the website."],
    ),
    ("account", "permissions"): (
        ["Need admin rights", "Colleague cannot see shared workspace", "Access denied to reports",
         "Role change request"],
        ["Please give my colleague editor access to our team workspace; right now she only sees it read-only.",
         "I get 'access denied' when opening the {system} reports even though I am the account owner.",
         "After the reorganisation I need admin permissions on the {system} project to add new users.",
         "Two new hires cannot open the shared folders in {system}. Which role do they need?"],
    ),
    ("technical", "bug"): (
        ["App crashes on startup", "Error {code} when saving", "Sync broken after update", "{product} keeps rebooting"],
        ["Since the latest update the {product} app crashes as soon as I open it. Reinstalling did not help.",
         "Saving a document throws error {code} and the changes are lost.",
         "The {product} stops syncing after the firmware update; the status light blinks red.",
         "When I export to CSV the file is empty, although the table on screen has data. Looks like a bug."],
    ),
    ("technical", "performance"): (
        ["Very slow dashboard", "{product} is lagging", "Pages take forever to load", "High latency since Monday"],
        ["The dashboard takes almost a minute to load for our team; it used to take two seconds.",
         "The {product} has become really sluggish, every action lags by several seconds.",
         "Reports in {system} time out when we select more than {days} days of data.",
         "API response times went from 200 ms to over 5 seconds since Monday."],
    ),
    ("shipping", "delay"): (
        ["Where is my order {order}?", "Package late", "Delivery still pending", "Tracking not updated"],
        ["My order {order} was supposed to arrive {days} days ago and tracking has not moved since.",
         "The {product} I ordered still shows 'label created'. When will it actually ship?",
         "Delivery was promised for last Friday but nothing arrived and the courier has no information.",
         "Order {order} has been 'in transit' for {days} days. Is it lost?"],
    ),
    ("shipping", "damaged"): (
        ["Item arrived broken", "Damaged package", "{product} arrived cracked", "Box crushed on delivery"],
        ["The {product} arrived with a cracked screen; the box was clearly crushed in transit.",
         "Order {order} came today but two items are broken and the packaging was wet.",
         "The {product} is dented on the side and does not power on. Photos attached.",
         "Parts were missing and the remaining ones were scratched when the parcel arrived."],
    ),
    ("product", "feature_request"): (
        ["Feature idea: {feature}", "Please add {feature}", "Suggestion for {product}", "Would love {feature}"],
        ["It would be great if {product} supported {feature}. Our team would use it daily.",
         "Any plans to add {feature}? Competitors already offer it and we would pay extra.",
         "Suggestion: let us configure {feature} per user instead of per account.",
         "We would like {feature} in the next release of {product}."],
    ),
    ("product", "compatibility"): (
        ["Does {product} work with {system}?", "Compatibility question", "Supported on Linux?",
         "Will it run on older hardware?"],
        ["Before we buy ten units: is the {product} compatible with {system}?",
         "Does {product} run on Linux or only on Windows and macOS?",
         "We have older docking stations at the office. Will the {product} work with them?",
         "Is the {product} API compatible with {system} version 3, or do we need to upgrade?"],
    ),
    ("unrelated", "none"): (
        ["Partnership opportunity", "Question about your office", "Newsletter", "Job application",
         "Lunch recommendation?"],
        ["We are a marketing agency and would love to discuss a partnership with your brand.",
         "Is your office open to visitors on weekends? I would like to drop by and say hello.",
         "Please find attached my CV for the open designer position.",
         "Congratulations on the award last month! Just wanted to say we love your blog.",
         "Does anyone know a good lunch place near your headquarters?"],
    ),
}
FEATURES = ["dark mode", "CSV export", "single sign-on", "offline mode", "keyboard shortcuts", "webhooks",
            "a calendar view", "custom fields"]
SYSTEMS = ["Windows 11", "macOS Sonoma", "Ubuntu 24.04", "Salesforce", "SAP", "Jira", "Google Workspace"]

URGENCY_CUES: dict[str, list[str]] = {
    "high": ["This is urgent, our whole team is blocked.",
             "Please treat this as top priority, we lose money every hour.",
             "URGENT: need a fix today.", "Production is down because of this, please respond ASAP.",
             "Critical for a customer demo tomorrow morning!"],
    "medium": ["Could you look into this this week?", "Would appreciate an answer in the next few days.",
               "It is annoying but we have a workaround for now.", "Please get back to me when you can this week."],
    "low": ["No rush at all.", "Whenever you have time.", "Just a heads-up, not important.",
            "Low priority, only curious.", "Not urgent, answer at your convenience."],
}


def generate_tickets(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    classes = [(category, sub) for category, subs in TAXONOMY.items() for sub in subs]
    start = dt.date(2025, 1, 1)
    tickets = []
    for index in range(n):
        category, subcategory = rng.choice(classes)
        urgency = "low" if category == "unrelated" and rng.random() < 0.8 else rng.choice(URGENCIES)
        first, last = rng.choice(FIRST), rng.choice(LAST)
        slots = {
            "product": rng.choice(PRODUCTS), "order": f"#{rng.randint(10000, 99999)}",
            "amount": f"{rng.randint(9, 900)}.{rng.randint(0, 99):02d}", "code": f"E{rng.randint(100, 999)}",
            "days": rng.randint(2, 30), "feature": rng.choice(FEATURES), "system": rng.choice(SYSTEMS),
        }
        titles, bodies = CONTENT[(category, subcategory)]
        cue = rng.choice(URGENCY_CUES[urgency])
        body = rng.choice(bodies).format(**slots)
        parts = [rng.choice(OPENERS), *((cue, body) if rng.random() < 0.4 else (body, cue))]
        parts.append(rng.choice(CLOSERS).format(first=first, last=last))
        tickets.append({
            "id": f"T{seed}-{index:06d}",
            "title": rng.choice(titles).format(**slots),
            "description": "\n".join(part for part in parts if part),
            "user": f"{first.lower()}.{last.lower()}@example.com",
            "date": (start + dt.timedelta(days=rng.randint(0, 364))).isoformat(),
            "category": category,
            "subcategory": subcategory,
            "urgency": urgency,
        })
    return tickets
