"""Document ingestion: sources (upload, URL) → sandboxed parsing (text layer, OCR fallback) → token chunks →
embeddings in vector memory. One bad document is a per-document error, never the whole task's."""
