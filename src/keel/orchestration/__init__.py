"""Layer 2: orchestration. Workflows, their context, and the runtime that leases and runs them."""
