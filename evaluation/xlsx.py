"""A minimal, dependency-free .xlsx writer (and reader for its own files and simple sheets).

MMBench's submission is a spreadsheet (LLaVA writes it with pandas + openpyxl). One sheet of
strings and numbers needs only five small XML parts, so it is written here with ``zipfile`` rather
than adding pandas/openpyxl to the runtime dependencies. Strings are inline strings; characters XML
1.0 forbids (control characters) are dropped, as openpyxl would refuse them. ``None`` is an empty
cell. The file is written atomically.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Iterable, Sequence
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from evaluation.files import atomic_write

__all__ = ["column_letter", "read_xlsx", "write_xlsx"]

_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"

_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
    '<Override PartName="/xl/styles.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
    "</Types>"
)
_ROOT_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
    'Target="xl/workbook.xml"/></Relationships>'
)
_WORKBOOK = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    f'<workbook xmlns="{_NS}" '
    'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
    '<sheets><sheet name="{name}" sheetId="1" r:id="rId1"/></sheets></workbook>'
)
_WORKBOOK_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet" '
    'Target="worksheets/sheet1.xml"/>'
    '<Relationship Id="rId2" '
    'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/styles" '
    'Target="styles.xml"/></Relationships>'
)
_STYLES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    f'<styleSheet xmlns="{_NS}">'
    '<fonts count="1"><font><sz val="11"/><name val="Calibri"/></font></fonts>'
    '<fills count="2"><fill><patternFill patternType="none"/></fill>'
    '<fill><patternFill patternType="gray125"/></fill></fills>'
    '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
    '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
    '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/></cellXfs>'
    '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
    "</styleSheet>"
)


def column_letter(i: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA."""
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(65 + r) + s
    return s


def _cell(ref: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):  # NaN/inf: empty, like pandas
            return ""
        return f'<c r="{ref}"><v>{value!r}</v></c>'
    text = escape(_ILLEGAL_XML.sub("", str(value)))
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'


def write_xlsx(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]], sheet: str = "Sheet1"
) -> None:
    """Write one sheet: ``header`` then ``rows`` (str, int, float or None cells), atomically."""
    lines = []
    for r, row in enumerate([list(header), *map(list, rows)], start=1):
        cells = "".join(_cell(f"{column_letter(c)}{r}", v) for c, v in enumerate(row))
        lines.append(f'<row r="{r}">{cells}</row>')
    sheet_xml = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        f'<worksheet xmlns="{_NS}"><sheetData>{"".join(lines)}</sheetData></worksheet>'
    )
    with atomic_write(path, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("[Content_Types].xml", _CONTENT_TYPES)
            z.writestr("_rels/.rels", _ROOT_RELS)
            z.writestr("xl/workbook.xml", _WORKBOOK.replace("{name}", escape(sheet)))
            z.writestr("xl/_rels/workbook.xml.rels", _WORKBOOK_RELS)
            z.writestr("xl/styles.xml", _STYLES)
            z.writestr("xl/worksheets/sheet1.xml", sheet_xml)


def _col_index(ref: str) -> int:
    n = 0
    for ch in re.match(r"[A-Z]+", ref).group(0):
        n = n * 26 + ord(ch) - 64
    return n - 1


def read_xlsx(path: str | os.PathLike) -> list[list[Any]]:
    """Rows of the first sheet (inline or shared strings, numbers as int/float, empty -> None)."""
    ns = {"m": _NS}
    with zipfile.ZipFile(path) as z:
        shared = []
        if "xl/sharedStrings.xml" in z.namelist():
            root = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))
            shared = [
                "".join(t.text or "" for t in si.iter(f"{{{_NS}}}t")) for si in root.findall("m:si", ns)
            ]
        root = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
    out = []
    for row in root.iter(f"{{{_NS}}}row"):
        values: list[Any] = []
        for c in row.findall("m:c", ns):
            idx = _col_index(c.get("r"))
            values.extend([None] * (idx - len(values) + 1))
            t = c.get("t")
            if t == "inlineStr":
                values[idx] = "".join(x.text or "" for x in c.iter(f"{{{_NS}}}t"))
            elif t == "s":
                values[idx] = shared[int(c.find("m:v", ns).text)]
            else:
                v = c.find("m:v", ns)
                if v is not None and v.text is not None:
                    num = float(v.text)
                    values[idx] = int(num) if num.is_integer() and re.fullmatch(r"-?\d+", v.text) else num
        out.append(values)
    width = max((len(r) for r in out), default=0)
    return [r + [None] * (width - len(r)) for r in out]
