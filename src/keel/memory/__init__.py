"""Layer 3: memory. Store seams (Protocols) and the domain types they carry."""
