"""Small MCP servers the MCP-client tests run as subprocesses."""
