"""A help desk's own export, written here in our own words: German tickets with the team's taxonomy (one subcategory
name under three categories), saved as Excel saves "CSV UTF-8": byte-order mark, `;` separator, CRLF line ends,
a description with a line break inside its quotes, commas and semicolons in the text."""

from __future__ import annotations

import csv
import io

COLUMNS = {"title": "Betreff", "description": "Beschreibung", "category": "Kategorie",
           "subcategory": "Unterkategorie", "urgency": "Dringlichkeit"}

# (category, subcategory, title, description); urgency is cycled below.
TICKETS = [
    ("Hardware", "Drucker", "Drucker im 2. OG druckt leer", "Der Drucker im zweiten Stock zieht Papier ein, aber die "
     "Seiten bleiben weiß. Toner wurde gestern getauscht."),
    ("Hardware", "Drucker", "Papierstau, schon wieder",
     "Seit heute Morgen meldet der Etagendrucker ständig Papierstau; "
     "wir haben Fach 2 geleert, hilft nicht."),
    ("Hardware", "Laptop", "Akku hält keine Stunde", "Mein Dienstlaptop geht nach 40 Minuten aus, obwohl der Akku "
     "laut Anzeige voll ist."),
    ("Hardware", "Laptop", "Bildschirm flackert", "Das Display meines Notebooks flackert, sobald ich es an die "
     "Dockingstation anschließe.\nOhne Dock ist alles normal."),
    ("Hardware", "Feedback und Vorschläge", "Idee: zweiter Monitor", "Vorschlag: Für die Buchhaltung wären zweite "
     "Monitore sehr hilfreich, wir arbeiten viel mit Tabellen."),
    ("Software", "Absturz", "Buchungsprogramm stürzt ab", "Beim Speichern einer Buchung schließt sich das Programm "
     "ohne Meldung; alle Eingaben sind weg."),
    ("Software", "Absturz", "Excel hängt beim Öffnen", "Excel friert beim Öffnen der Monatsliste ein, der Rechner "
     "reagiert dann minutenlang nicht."),
    ("Software", "Installation", "Bitte Zeichenprogramm installieren", "Für das neue Projekt brauche ich ein "
     "Zeichenprogramm; können Sie es auf meinem Rechner installieren?"),
    ("Software", "Installation", "Update schlägt fehl", "Das Update der Kundenverwaltung bricht bei 80 % mit "
     "Fehler 1603 ab."),
    ("Software", "Feedback und Vorschläge", "Lob für das neue Portal", "Das neue Self-Service-Portal ist viel "
     "übersichtlicher, danke! Eine Suchfunktion wäre noch schön."),
    ("Zugang & Konten", "Passwort", "Passwort abgelaufen", "Ich kann mich nicht mehr anmelden, mein Passwort ist "
     "abgelaufen und der Reset-Link kommt nicht an."),
    ("Zugang & Konten", "Passwort", "Konto gesperrt", "Nach drei Fehlversuchen ist mein Konto gesperrt. Bitte "
     "entsperren, ich habe gleich ein Kundengespräch."),
    ("Zugang & Konten", "Berechtigungen", "Kein Zugriff auf Laufwerk P:", "Seit dem Abteilungswechsel fehlt mir der "
     "Zugriff auf das Projektlaufwerk P:; mein Teamleiter hat zugestimmt."),
    ("Zugang & Konten", "Berechtigungen", "Leserechte für Vertriebsordner", "Bitte geben Sie Frau Öztürk "
     "Leserechte auf den Ordner Vertrieb/Angebote."),
    ("Rechnung", "Gutschrift", "Gutschrift fehlt", "Für die Retoure vom 3. März haben wir noch keine Gutschrift "
     "erhalten, Betrag 249,90 €."),
    ("Rechnung", "Gutschrift", "Doppelt abgebucht", "Die Lizenzgebühr wurde zweimal abgebucht; bitte den doppelten "
     "Betrag gutschreiben."),
    ("Rechnung", "Feedback und Vorschläge", "Rechnung als PDF", "Wäre es möglich, die Rechnungen künftig als PDF "
     "per E-Mail statt per Post zu schicken?"),
]
URGENCIES = ["Hoch", "Mittel", "Niedrig"]
OPENERS = ["", "Hallo IT-Team,\n", "Guten Tag, ", "Moin, "]


def german_tickets(n: int) -> list[dict]:
    """`n` labelled tickets, task field names; every category, subcategory and urgency occurs for n >= 17."""
    rows = []
    for i in range(n):
        category, subcategory, title, description = TICKETS[i % len(TICKETS)]
        rows.append({"title": title if i < len(TICKETS) else f"{title} ({i // len(TICKETS) + 1})",
                     "description": OPENERS[i % len(OPENERS)] + description,
                     "category": category, "subcategory": subcategory, "urgency": URGENCIES[i % 3]})
    return rows


def excel_csv(rows: list[dict], fields: list[str]) -> bytes:
    """`rows` under the team's column names, as Excel writes "CSV UTF-8" in a German locale."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=";", lineterminator="\r\n")
    writer.writerow([COLUMNS.get(f, f) for f in fields])
    writer.writerows([row[f] for f in fields] for row in rows)
    return ("\ufeff" + out.getvalue()).encode("utf-8")
