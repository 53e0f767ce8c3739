"""The metadata agent: identify the instance, sign it, ask the metadata server."""
