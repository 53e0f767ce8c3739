"""The embedded metadata server and its store."""
