"""Subcommands of the ``metaverify`` CLI, one module each (see :mod:`verify.cli`)."""
