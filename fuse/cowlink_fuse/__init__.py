"""cowlink_fuse: the copy-on-write FUSE layer through which guests see their unified trees.

General layout (dependencies point one way, cowlink_fuse -> cowlink):

    _inodes   FUSE inode numbers, backing inodes, names, lookup counts (no I/O)
    _groups   the catalogue as one guest sees it: store objects and link groups
    _cow      blocking copy-on-write steps, run in worker threads
    _ops      the pyfuse3 handlers; the only place FUSEError is raised
    _loop     what pyfuse3's request loop sees as trio: trio, waiting less between requests
    _mount    the daemon: mount, serve, unmount; `python -m cowlink_fuse` runs it
"""

from ._mount import MountOptions as MountOptions
from ._mount import serve as serve
from ._ops import CowlinkOperations as CowlinkOperations
