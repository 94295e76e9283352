//! The shared store: PostgreSQL, for a fleet of nodes.
