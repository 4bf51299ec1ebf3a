"""`python -m cowlink_fuse`: the mount daemon that `cowlink mount` starts; not for people."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cowlink._home import Home

from ._mount import MountOptions, RootBusy, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cowlink_fuse")
    parser.add_argument("--home", required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--no-writeback", action="store_true")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("root")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(
        level=level, format=f"%(asctime)s cowlink-mount[{os.getpid()}] %(levelname)s %(message)s"
    )
    if args.ready_fd is not None:
        os.set_inheritable(args.ready_fd, False)  # helpers such as fusermount3 must not hold it
    home = Home(args.home)
    try:
        serve(
            MountOptions(
                root=args.root,
                mountpoint=args.mountpoint,
                # Opened (made, if need be) even before any unify run: the first run may
                # come while the guest is mounted, and the mount must see what it links.
                catalogue=home.catalogue_path,
                secret=home.secret(),
                writeback=not args.no_writeback,
                ready_fd=args.ready_fd,
                run_dir=home.run_dir,
            )
        )
    except RootBusy as exc:
        logging.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
