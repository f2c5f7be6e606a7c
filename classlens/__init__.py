"""ClassLens: engagement analytics for online classes. This package is the application.

Its entry points (the command line, :mod:`classlens.cli` and the ``cli_*`` modules it
registers; the web app and API, :mod:`classlens.server`) and the orchestrations they start
(a recorded lecture, :mod:`classlens.analysis`; privacy and retention,
:mod:`classlens.privacy`; sign-in, :mod:`classlens.webauth`). What every package builds on
is in :mod:`kernel`; docs/architecture.md shows the layers.
"""

__version__ = "0.1.0"
