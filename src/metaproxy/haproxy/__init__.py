"""The haproxy front: one hardened haproxy per network or router."""
