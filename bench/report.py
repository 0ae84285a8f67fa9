"""How every benchmark ends: print its markdown table, write it to `<out>.md` and its figures to
`<out>.json` (making the folder)."""
from __future__ import annotations

import json
import os


def write_report(out: str, table: str, payload) -> None:
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as fh:
        fh.write(table + "\n")
    with open(out + ".json", "w") as fh:
        json.dump(payload, fh, indent=1)
