"""The global scheduler service (see ``app``)."""
