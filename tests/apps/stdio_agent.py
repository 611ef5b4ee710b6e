"""An agent using the official MCP client's stdio transport, as a plain (unpatched) program.

The test process is gevent-patched, and asyncio cannot spawn children there
from a native thread (gevent's child watchers need the default loop), so the
tests run this script: it reads {agent, runs: [{server: {...StdioServerParameters},
calls: [[tool, args], ...]}, ...]} on stdin and prints, for each run, the server
info, tool names and tool results as JSON.
"""
import json
import sys

import anyio
from mcp import Client, StdioServerParameters
from mcp_types import Implementation


async def run(spec, agent):
    params = StdioServerParameters(**spec["server"])
    async with Client(params, mode="legacy", client_info=agent) as client:
        tools = await client.list_tools()
        results = [await client.call_tool(name, args) for name, args in spec["calls"]]
        return {"server_info": client.server_info.model_dump(mode="json"),
                "tools": [t.name for t in tools.tools],
                "results": [r.model_dump(mode="json", by_alias=True) for r in results]}


async def main(spec):
    agent = Implementation(**spec["agent"])
    return [await run(one, agent) for one in spec["runs"]]


if __name__ == "__main__":
    print(json.dumps(anyio.run(main, json.load(sys.stdin))))
