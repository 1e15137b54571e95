"""LLM code: model adapters, generation with repair, the planner, map-reduce and the agent loop."""
