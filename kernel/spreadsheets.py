"""Text that leaves ClassLens in CSV files, which people open in spreadsheet programs.

A cell that starts with ``=``, ``+``, ``-`` or ``@`` is a formula to Excel, LibreOffice and
Google Sheets, and one that starts with a TAB or a carriage return can be read as one after
the program strips it. Names that participants choose themselves (a meeting display name,
a stream) reach the exports, so every text cell is neutralised before it is written.
"""

from __future__ import annotations

#: First characters that make a spreadsheet program read a cell as a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """The text, with a leading apostrophe when a spreadsheet would read it as a formula.

    The apostrophe is the spreadsheet programs' own mark for "this is text"; they show the
    cell without it.
    """
    return "'" + text if text.startswith(FORMULA_STARTS) else text
