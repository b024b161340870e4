"""``python -m tsf ...``: the same program as the ``tsf`` command."""

from tsf.cli import main

if __name__ == "__main__":
    main()
