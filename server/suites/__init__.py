"""Test suites per adapter name, and the gate they put on promotion (see docs/rollouts.md)."""
