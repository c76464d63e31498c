"""`hfrewrite serve`: the OpenAI-compatible HTTP server (protocol, engine loop, app, metrics, command)."""
