"""The host service: composes the roles, reconciles fronts, supervises processes."""
