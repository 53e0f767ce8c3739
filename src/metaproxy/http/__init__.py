"""HTTP/1.1 codec, the front's request policy, and pooled upstream clients."""
