"""The builtin front: one asyncio process serving every network's listener."""
