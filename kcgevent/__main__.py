"""`python -m kcgevent` (and the `kcgevent` script): patch for gevent first, then run the CLI.

`mcp-stdio` is a plain asyncio program (the MCP SDK's stdio transport): it is not patched.
"""
import sys

if sys.argv[1:2] != ["mcp-stdio"]:
    from gevent import monkey

    monkey.patch_all()


def main():
    from kcgevent.cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
