"""The MCP server for AI agents: workspaces, their channel to Positron, the agents' listener, the tools."""
