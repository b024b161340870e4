"""``python -m tsf ...``: the same program as the ``tsf`` command (Ctrl-C while it starts ends it quietly)."""

import sys

if __name__ == "__main__":
    try:
        from tsf.commands import main
    except KeyboardInterrupt:
        print("\ntsf: interrupted while starting; nothing was run", file=sys.stderr)
        sys.exit(130)
    main()
