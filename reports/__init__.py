"""Reports: what a teacher reads after class.

:mod:`reports.aggregate` turns store rows into frozen report data (per-student
timelines and summaries, the class over time), :mod:`reports.charts` draws them as
accessible SVG, :mod:`reports.export` writes CSV and JSON timelines, and
:mod:`reports.render` renders the Jinja2 templates into a self-contained report folder.
"""
