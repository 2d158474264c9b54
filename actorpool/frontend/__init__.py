"""The HTTP front end of ``actorpool serve``."""
