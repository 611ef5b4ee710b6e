"""`python -m kcgevent` (and the `kcgevent` script): patch for gevent first, then run the CLI."""
from gevent import monkey

monkey.patch_all()


def main():
    from kcgevent.cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()
