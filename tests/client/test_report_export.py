"""The RIS export reader: every row is a report or a named problem; one bad row never loses the file."""

from __future__ import annotations

import json

import pytest

from client.ingest import reasons
from client.ingest.reasons import IngestError
from client.ingest.report_export import read_report_export
from client.site_config import ReportsConfig


def test_csv_with_quoted_multiline_reports_bad_rows_and_duplicates(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_bytes(
        b'AccessionNumber,ReportText\n'
        b'A1,"FINDINGS: No effusion.\nIMPRESSION: Normal."\n'
        b'A2,\n'
        b'A3,"Caf\xe9 latin-1 bytes"\n'
        b'A1,"again"\n'
        b',"no key"\n'
        b'A4,"Small nodule."\n'
    )
    reports, problems, rows = read_report_export(ReportsConfig(path=str(path)))
    assert rows == 6
    assert set(reports) == {"A1", "A4"}
    assert reports["A1"].text == "FINDINGS: No effusion.\nIMPRESSION: Normal."
    assert [p.reason for p in problems] == [
        reasons.EMPTY_REPORT, reasons.UNREADABLE_REPORT_ROW, reasons.DUPLICATE_REPORT, reasons.UNREADABLE_REPORT_ROW]
    assert len(reports) + len(problems) == rows  # every row accounted for


def test_csv_missing_columns_names_them_and_what_to_do(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text("Acc,Text\nA1,hello\n")
    with pytest.raises(IngestError, match="missing column\\(s\\) \\['AccessionNumber', 'ReportText'\\]") as info:
        read_report_export(ReportsConfig(path=str(path)))
    assert info.value.reason == reasons.REPORT_FILE_UNUSABLE and "key_column" in info.value.detail


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_export_saved_with_a_byte_order_mark_reads_like_one_without(tmp_path, fmt):
    """Excel's "CSV UTF-8" starts the file with a BOM; the first column is still AccessionNumber."""
    path = tmp_path / f"reports.{fmt}"
    body = ('AccessionNumber,ReportText\nA1,"Small left pleural effusion."\nA2,"No nodules."\n' if fmt == "csv" else
            json.dumps({"AccessionNumber": "A1", "ReportText": "Small left pleural effusion."}) + "\n"
            + json.dumps({"AccessionNumber": "A2", "ReportText": "No nodules."}) + "\n")
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    reports, problems, rows = read_report_export(ReportsConfig(path=str(path)))
    assert (rows, problems) == (2, [])
    assert reports["A1"].text == "Small left pleural effusion." and set(reports) == {"A1", "A2"}


def test_jsonl_rows_with_custom_keys(tmp_path):
    path = tmp_path / "reports.jsonl"
    path.write_text("\n".join([
        json.dumps({"accession_number": "B1", "text": "No hemorrhage."}),
        "{not json",
        json.dumps({"accession_number": "B2"}),
        json.dumps({"accession_number": "B3", "text": "Small infarct."}),
    ]))
    cfg = ReportsConfig(path=str(path), key_column="accession_number", text_column="text")
    reports, problems, rows = read_report_export(cfg)
    assert set(reports) == {"B1", "B3"} and rows == 4
    assert [p.reason for p in problems] == [reasons.UNREADABLE_REPORT_ROW] * 2
    assert problems[0].location == "reports.jsonl:2"
