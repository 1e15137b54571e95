"""Layer 1: the HTTP edge. Routes, wire schemas, SSE, webhooks, auth and problem details."""
