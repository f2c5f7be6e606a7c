"""ClassLens: engagement analytics for online classes.

The project package holds what every app shares: settings (:mod:`kernel.settings`),
the typed domain objects that flow between stages (:mod:`kernel.types`), the store
schema (:mod:`kernel.store`) and the command line (:mod:`classlens.cli`).
"""

__version__ = "0.1.0"
