"""The ``spamask-integrate`` command line."""
