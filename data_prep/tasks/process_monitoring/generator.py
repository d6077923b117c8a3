"""Seeded synthetic event logs shaped like BPI 2020 Request for Payment, with the exact next-activity posterior.

The process is a Markov chain over a state that is a function of the observable history — the last activity, the
case's organisational unit and amount (attributes on every event) and how many times the request was rejected so
far — so the distribution it samples the next activity from IS the posterior given the prefix, and the
Bayes-optimal prediction is its argmax. Routing depends on attributes (budget-owner approval above an amount, a
pre-approver and more rejections in some units), has a rework loop, and waiting times are log-normal, placed in
working hours (Mon-Fri, 8-18).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd

END = "<end>"
SUBMITTED = "Request For Payment SUBMITTED by EMPLOYEE"
ADMIN_APPROVED = "Request For Payment APPROVED by ADMINISTRATION"
ADMIN_REJECTED = "Request For Payment REJECTED by ADMINISTRATION"
PRE_APPROVED = "Request For Payment APPROVED by PRE_APPROVER"
BUDGET_APPROVED = "Request For Payment APPROVED by BUDGET OWNER"
FINAL_APPROVED = "Request For Payment FINAL_APPROVED by SUPERVISOR"
SUPERVISOR_REJECTED = "Request For Payment REJECTED by SUPERVISOR"
EMPLOYEE_REJECTED = "Request For Payment REJECTED by EMPLOYEE"
REQUEST_PAYMENT = "Request Payment"
PAYMENT_HANDLED = "Payment Handled"

UNITS = ("organizational unit 1", "organizational unit 2", "organizational unit 3", "organizational unit 4",
         "organizational unit 5")
BUDGET_LIMIT = 1000.0  # euros: above it the budget owner approves too
SYSTEM_ACTIVITIES = frozenset({REQUEST_PAYMENT, PAYMENT_HANDLED})
# Median waiting time (hours) before each activity, and the log-normal spread.
MEDIAN_WAIT_H = {ADMIN_APPROVED: 20, ADMIN_REJECTED: 30, PRE_APPROVED: 10, BUDGET_APPROVED: 40, FINAL_APPROVED: 30,
                 SUPERVISOR_REJECTED: 36, EMPLOYEE_REJECTED: 60, SUBMITTED: 70, REQUEST_PAYMENT: 50,
                 PAYMENT_HANDLED: 40}
SIGMA = 0.6
COLUMNS = {"case": "case:concept:name", "activity": "concept:name", "timestamp": "time:timestamp",
           "resource": "org:resource", "unit": "case:OrganizationalEntity", "amount": "case:Amount"}


@dataclass(frozen=True)
class CaseState:
    last: str
    unit: str
    amount: float
    rejections: int


def next_distribution(state: CaseState) -> dict[str, float]:
    """P(next activity | observable prefix): the rules of the process."""
    strict = state.unit in UNITS[3:]  # units 4 and 5 reject more often
    after_approval = BUDGET_APPROVED if state.amount > BUDGET_LIMIT else FINAL_APPROVED
    if state.last == SUBMITTED:
        approve = 0.6 if strict else 0.88
        return {ADMIN_APPROVED: approve, ADMIN_REJECTED: 1 - approve}
    if state.last == ADMIN_APPROVED:
        if state.unit == UNITS[2]:
            return {PRE_APPROVED: 1.0}
        return {after_approval: 0.9, SUPERVISOR_REJECTED: 0.1}
    if state.last == PRE_APPROVED:
        return {after_approval: 0.8, SUPERVISOR_REJECTED: 0.2}
    if state.last == BUDGET_APPROVED:
        return {FINAL_APPROVED: 0.95, SUPERVISOR_REJECTED: 0.05}
    if state.last in (ADMIN_REJECTED, SUPERVISOR_REJECTED):
        return {EMPLOYEE_REJECTED: 1.0}
    if state.last == EMPLOYEE_REJECTED:
        return {SUBMITTED: 0.75, END: 0.25} if state.rejections < 2 else {END: 1.0}
    if state.last == FINAL_APPROVED:
        return {REQUEST_PAYMENT: 1.0}
    if state.last == REQUEST_PAYMENT:
        return {PAYMENT_HANDLED: 1.0}
    if state.last == PAYMENT_HANDLED:
        return {END: 1.0}
    raise ValueError(f"no rule after {state.last!r}")


def _working_time(moment: datetime) -> datetime:
    """The same moment moved forward into working hours (Mon-Fri 8:00-18:00)."""
    if moment.hour >= 18:
        moment = (moment + timedelta(days=1)).replace(hour=8, minute=0, second=0)
    elif moment.hour < 8:
        moment = moment.replace(hour=8, minute=0, second=0)
    while moment.weekday() >= 5:
        moment = (moment + timedelta(days=1)).replace(hour=8, minute=0, second=0)
    return moment


@dataclass(frozen=True)
class SyntheticLog:
    events: pd.DataFrame  # one row per event, XES column names (COLUMNS)
    # Per case id: for each event, (Bayes-optimal next activity, its posterior probability).
    bayes: dict[str, list[tuple[str, float]]]


def generate_log(n_cases: int, seed: int) -> SyntheticLog:
    """`n_cases` cases starting about 4 working hours apart from 2018-01-01; identical for the same seed."""
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []
    bayes: dict[str, list[tuple[str, float]]] = {}
    start = datetime(2018, 1, 1, 8, tzinfo=timezone.utc)
    for number in range(n_cases):
        start = _working_time(start + timedelta(seconds=round(float(rng.exponential(4.0)) * 3600)))
        case = f"request for payment {number + 1}"
        unit = UNITS[int(rng.choice(len(UNITS), p=[0.3, 0.25, 0.2, 0.15, 0.1]))]
        # Bimodal amounts (small claims, larger ones), far from the budget limit either way, rounded to cents.
        amount = round(float(rng.lognormal(math.log(200), 0.5) if rng.random() < 0.6
                             else rng.lognormal(math.log(4000), 0.5)), 2)
        state = CaseState(SUBMITTED, unit, amount, 0)
        moment = start
        posteriors = []
        while True:
            rows.append((case, state.last, moment, "SYSTEM" if state.last in SYSTEM_ACTIVITIES else "STAFF MEMBER",
                         unit, amount))
            dist = next_distribution(state)
            best = max(dist, key=dist.get)
            posteriors.append((best, dist[best]))
            names = list(dist)
            nxt = names[int(rng.choice(len(names), p=list(dist.values())))]
            if nxt == END:
                break
            wait = rng.lognormal(math.log(MEDIAN_WAIT_H[nxt]), SIGMA)
            moment = _working_time(moment + timedelta(seconds=round(float(wait) * 3600)))
            state = CaseState(nxt, unit, amount, state.rejections + (nxt == EMPLOYEE_REJECTED))
        bayes[case] = posteriors
    frame = pd.DataFrame(rows, columns=[COLUMNS[k] for k in ("case", "activity", "timestamp", "resource", "unit",
                                                             "amount")])
    return SyntheticLog(frame, bayes)
