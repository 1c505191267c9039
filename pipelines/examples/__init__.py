"""Custom DAGs built from a subset of the operators (see docs/operators.md)."""
