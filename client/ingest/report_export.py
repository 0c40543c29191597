"""Read a RIS report export (CSV or JSONL) into reports keyed by accession number or StudyInstanceUID.

Every row ends as a report or as a problem with a reason: the file is decoded with
``surrogateescape`` so that one row with bytes that are not valid in the configured encoding is
refused on its own instead of failing the whole file.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from . import reasons
from .reasons import IngestError


@dataclass(frozen=True)
class Report:
    key: str
    text: str
    location: str  # "reports.csv:12" (file name and row or line number)


@dataclass(frozen=True)
class RowProblem:
    reason: str
    location: str
    detail: str


def _fmt(path: Path, cfg) -> str:
    if cfg.format != "auto":
        return cfg.format
    return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"


def read_report_export(cfg) -> tuple[dict[str, Report], list[RowProblem], int]:
    """Reports by key, row problems, and the number of rows seen.

    Args:
        cfg: the site config's ``data.reports`` section (path, format, key_column, text_column, encoding).

    Raises:
        IngestError(REPORT_FILE_UNUSABLE): the file cannot be opened, or lacks the key or text column.
    """
    path = Path(cfg.path)
    try:
        text = path.read_bytes().decode(cfg.encoding, errors="surrogateescape")
    except (OSError, LookupError) as err:
        raise IngestError(reasons.REPORT_FILE_UNUSABLE, f"{path}: {err}") from None
    # Excel's "CSV UTF-8" (and Notepad) start the file with a byte-order mark: not part of the first
    # column's name (decoded as UTF-8 it reads '\ufeffAccessionNumber')
    text = text.removeprefix("\ufeff")
    rows = _jsonl_rows(text, path, cfg) if _fmt(path, cfg) == "jsonl" else _csv_rows(text, path, cfg)
    reports: dict[str, Report] = {}
    problems: list[RowProblem] = []
    seen = 0
    for location, key, body, error in rows:
        seen += 1
        if error:
            problems.append(RowProblem(reasons.UNREADABLE_REPORT_ROW, location, error))
            continue
        if _has_bad_bytes(key) or _has_bad_bytes(body):
            problems.append(RowProblem(reasons.UNREADABLE_REPORT_ROW, location, f"not valid {cfg.encoding} text"))
            continue
        key, body = key.strip(), body.strip()
        if not key:
            problems.append(RowProblem(reasons.UNREADABLE_REPORT_ROW, location, f"empty {cfg.key_column}"))
        elif not body:
            problems.append(RowProblem(reasons.EMPTY_REPORT, location, f"{cfg.key_column}={key} has no text"))
        elif key in reports:
            first = reports[key].location
            problems.append(RowProblem(reasons.DUPLICATE_REPORT, location, f"{key} already reported at {first}"))
        else:
            reports[key] = Report(key, body, location)
    return reports, problems, seen


def _has_bad_bytes(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def _csv_rows(text: str, path: Path, cfg):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(text.splitlines(keepends=True))
    columns = reader.fieldnames or []
    missing = [c for c in (cfg.key_column, cfg.text_column) if c not in columns]
    if missing:
        raise IngestError(
            reasons.REPORT_FILE_UNUSABLE,
            f"{path}: missing column(s) {missing}; the file has {columns}. Set data.reports.key_column and "
            "data.reports.text_column in the site config to the export's column names.",
        )
    while True:
        location = f"{path.name}:{reader.line_num + 1}"
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield location, "", "", f"malformed CSV: {err}"
            continue
        if None in row or row.get(cfg.text_column) is None:
            yield location, "", "", "wrong number of fields"
            continue
        yield location, row[cfg.key_column] or "", row[cfg.text_column] or "", ""


def _jsonl_rows(text: str, path: Path, cfg):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        location = f"{path.name}:{number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            yield location, "", "", f"not JSON: {err}"
            continue
        if not isinstance(row, dict) or cfg.key_column not in row or cfg.text_column not in row:
            yield location, "", "", f"needs keys {cfg.key_column!r} and {cfg.text_column!r}"
            continue
        yield location, str(row[cfg.key_column] or ""), str(row[cfg.text_column] or ""), ""
