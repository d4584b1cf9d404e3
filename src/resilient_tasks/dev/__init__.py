"""For development and demos, not for production: an embedded broker that needs no server
(:mod:`resilient_tasks.dev.filesystem`)."""
