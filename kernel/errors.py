"""Errors that the command line turns into one-line messages and exit codes."""

from __future__ import annotations


class ClassLensError(Exception):
    """Base class of every error that ClassLens reports to a user without a traceback."""

    exit_code: int = 1


class BadInputError(ClassLensError):
    """The user's input (a file, an argument) cannot be analysed; exit code 2."""

    exit_code = 2


class ModelSupplyError(ClassLensError):
    """A model could not be fetched, verified, converted or loaded; the message says what to do."""

    exit_code = 3


class ConfigurationError(ClassLensError):
    """The configuration is invalid; the message names the bad key."""

    exit_code = 2
