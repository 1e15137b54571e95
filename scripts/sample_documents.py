"""Write the four sample PDFs of `make demo` into a folder: two vendor contracts whose terms conflict, a scanned
amendment (no text layer: it takes the OCR path) and an encrypted pricing schedule (skipped without its password).

    python scripts/sample_documents.py OUT_DIR

Everything is generated here, from the text below; nothing is downloaded. Existing files are left alone, so a
second run (a second `make demo`) reuses the same bytes, and so the same document ids.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from keel.testing.pdfs import make_pdf, make_scanned_pdf

VENDOR_A = [
    "MASTER SERVICES AGREEMENT\n"
    "Between Northwind Analytics Ltd (the Vendor) and Contoso Retail plc (the Customer).\n"
    "\n"
    "1. Services. The Vendor provides data analytics services as described in Schedule 1.\n"
    "2. Payment. The Customer pays each invoice within 30 days of the invoice date. No late fees apply.\n"
    "3. Liability. The Vendor's total liability is capped at the fees paid in the preceding 12 months.\n"
    "4. Term and termination. The agreement runs for 12 months and renews automatically. Either party may "
    "terminate on 90 days written notice.\n"
    "5. Data. Customer data is stored and processed in the European Union only.\n"
    "6. Governing law. This agreement is governed by the laws of England and Wales.",
]

VENDOR_B = [
    "SUPPLY AGREEMENT\n"
    "Between Fabrikam Logistics Inc (the Supplier) and Contoso Retail plc (the Customer).\n"
    "\n"
    "1. Supply. The Supplier delivers warehouse data services and the related software licences.\n"
    "2. Payment. Invoices are payable within 60 days. Late payments accrue interest at 2% per month.\n"
    "3. Liability. The Supplier's liability is unlimited for data breaches and otherwise capped at USD 50,000.\n"
    "4. Exclusivity. For 24 months the Customer buys data analytics services exclusively from the Supplier.\n"
    "5. Termination. The Supplier may terminate on 30 days notice. The Customer may terminate only for cause.\n"
    "6. Data. Customer data may be processed in any country where the Supplier operates.\n"
    "7. Governing law. This agreement is governed by the laws of the State of Delaware.",
]

AMENDMENT = [
    "AMENDMENT No. 1 TO THE MASTER SERVICES AGREEMENT\n"
    "Northwind Analytics and Contoso Retail agree:\n"
    "1. Payment is now due within 15 days of the invoice date.\n"
    "2. Fees increase by 8% from 1 January.\n"
    "3. All other terms are unchanged.",
]

PLANTED = [
    # (what, topic, {label: value}) with D1 vendor A, D2 vendor B, D3 the amendment, in the order demo.sh submits
    ("payment terms", "payment terms", {"D1": "30 days", "D2": "60 days"}),
    ("the amendment's new payment term", "payment terms", {"D1": "30 days", "D3": "15 days"}),
    ("liability", "liability", {"D1": "12 months", "D2": "unlimited"}),
    ("termination", "termination", {"D1": "90 days", "D2": "30 days"}),
    ("data location", "data location", {"D1": "European Union", "D2": "any country"}),
    ("governing law", "governing law", {"D1": "England", "D2": "Delaware"}),
]
"""The six conflicts the demo's documents plant, and what each document says."""

PRICING = ["CONFIDENTIAL PRICING SCHEDULE\nAnalytics platform: GBP 12,000 per month.\nSupport: GBP 2,500 per month."]
PASSWORD = "contoso-2026"


def write_samples(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vendor-a-services-agreement.pdf": lambda: make_pdf(VENDOR_A, metadata={"Title": "Master Services Agreement"}),
        "vendor-b-supply-agreement.pdf": lambda: make_pdf(VENDOR_B, metadata={"Title": "Supply Agreement"}),
        "vendor-a-amendment-scanned.pdf": lambda: make_scanned_pdf(AMENDMENT, dpi=200),
        "pricing-schedule-encrypted.pdf": lambda: make_pdf(PRICING, password=PASSWORD),
    }
    paths = []
    for name, build in files.items():
        path = out / name
        if not path.exists():
            path.write_bytes(build())
        paths.append(path)
    return paths


def named_conflicts(result: dict[str, Any]) -> list[tuple[str, bool]]:
    """For each planted conflict, whether the analysis names it: a conflict on its topic between its documents,
    each shown with its own value (its figure, or its words)."""
    conflicts = (result.get("comparison") or {}).get("conflicts") or []
    out = []
    for what, topic, said in PLANTED:
        named = False
        for c in conflicts:
            if c["topic"] != topic or not set(said) <= set(c["labels"]):
                continue
            parts = {p.split(" ", 1)[0]: p for p in c["detail"].split("; ")}
            named = all(_shows(value, parts.get(label, "")) for label, value in said.items())
        out.append((what, named))
    return out


def _shows(value: str, text: str) -> bool:
    digits = re.findall(r"\d+", value)
    if digits:
        return all(re.search(rf"\b{d}\b", text) for d in digits)
    return all(w in text.casefold() for w in value.casefold().split())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/sample_documents.py OUT_DIR")
    for p in write_samples(Path(sys.argv[1])):
        print(p)
