"""The per-case summary table (``summary.csv``): one row per case, read back on a rerun, written
atomically, with cells that a spreadsheet would run as a formula made inert."""

from __future__ import annotations

import csv
import io
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SUMMARY_FIELDS", "escape_cell", "unescape_cell", "read_summary", "summary_text"]

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("case", "input", "mask", "overlay", "dicom_seg", "volume_ml", "seconds", "status", "message")

# a cell starting with one of these is run as a formula by Excel / LibreOffice / Google Sheets (CSV injection,
# e.g. a scan named "=HYPERLINK(...).nii.gz"); OWASP's advice: prefix such a cell with a single quote
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def escape_cell(value) -> str:
    """``value`` as text, with a leading ``'`` when it starts like a spreadsheet formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def unescape_cell(text: str) -> str:
    """The inverse of ``escape_cell`` (for rows read back on a rerun)."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


def read_summary(path: str | Path, fields: Iterable[str] = SUMMARY_FIELDS) -> dict[str, dict]:
    """Rows of an existing summary, keyed by case (empty when there is no file). A file that cannot be read
    as this CSV is copied aside to ``<name>.unreadable`` (logged) and the run starts a new table."""
    path = Path(path)
    fields = tuple(fields)
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            rows = [row for row in csv.DictReader(stream) if row.get("case")]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        backup = path.with_name(path.name + ".unreadable")
        shutil.copy2(path, backup)
        logger.warning(f"summary {path} cannot be read ({error}): kept as {backup}, starting a new one.")
        return {}
    table = {}
    for row in rows:
        clean = {field: unescape_cell(row.get(field) or "") for field in fields}
        table[clean["case"]] = clean
    return table


def summary_text(rows: Iterable[dict], fields: Iterable[str] = SUMMARY_FIELDS) -> str:
    """The CSV text of ``rows`` (a header line, then one line per row; every cell escaped)."""
    fields = list(fields)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(fields)
    for row in rows:
        writer.writerow([escape_cell(row.get(field, "")) for field in fields])
    return buffer.getvalue()
