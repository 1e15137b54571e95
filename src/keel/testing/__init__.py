"""Test support: an in-memory store twin and the backend conformance suite. For tests only."""
