"""The pyfuse3 request handlers: a passthrough of the guest root with copy-on-write on shared files.

The only module (with _mount) that imports pyfuse3, and the only place FUSEError is
raised: every handler goes through `_handler`, which turns OSError into its errno and
anything else into EIO, logged as a bug.

Threading: handlers run as trio tasks on one thread. Small syscalls run inline (they
hit the page cache); copies and fsync run in worker threads, which touch only fds and
never the inode table or the catalogue.

Every name is reached through its parent's directory fd with *at() calls, so names up
to NAME_MAX in paths near PATH_MAX work. The daemon runs with umask 0 (the kernel
already applied the caller's) and as root: a created file gets the caller's uid and gid
(the parent's gid under a set-group-ID directory), and the mode it asked for.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from cowlink import _linux
from cowlink._store import TempNames

from . import _cow
from ._groups import SharedIndex
from ._inodes import InodeTable, Node, Share

log = logging.getLogger(__name__)

#: Entry and attribute timeout, in seconds: the guest tree changes only through the mount.
TIMEOUT = 3600.0
_OPEN_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SETID = stat.S_ISUID | stat.S_ISGID
_CAPS = b"security.capability"
#: Entries stat'ed (and looked up in the catalogue) together by readdir; a reply holds
#: about 25 (4 KiB) to 200, so a batch costs at most a few stats the reply cannot take.
_READDIR_BATCH = 64

P = ParamSpec("P")
R = TypeVar("R")


def _handler(
    fn: Callable[Concatenate[CowlinkOperations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[CowlinkOperations, P], Coroutine[Any, Any, R]]:
    """Let only FUSEError leave a handler: OSError keeps its errno, anything else is EIO."""

    async def wrapper(self: CowlinkOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", fn.__name__, args)
        try:
            return await fn(self, *args, **kwargs)
        except FUSEError as exc:
            log.debug("%s: %s", fn.__name__, errno.errorcode.get(exc.errno, exc.errno))
            raise
        except OSError as exc:
            log.debug("%s: %s", fn.__name__, exc)
            raise FUSEError(exc.errno or errno.EIO) from None
        except KeyError:
            # The kernel named an inode or handle we never gave or already forgot.
            raise FUSEError(errno.ESTALE) from None
        except Exception:
            log.exception("BUG in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None

    functools.update_wrapper(wrapper, fn)
    return wrapper


@dataclass(eq=False)
class _File:
    fd: int
    node: Node
    flags: int


@dataclass(eq=False)
class _Dir:
    node: Node
    entries: list[bytes] | None = None
    fd: int = -1  # opened when first needed: a walk mostly reads listings kept in memory


@dataclass
class Stats:
    """What the daemon did: logged at exit, and read by tests."""

    breaks: int = 0
    shared_unlinks: int = 0
    shared_renames: int = 0


class CowlinkOperations(pyfuse3.Operations):
    """A guest root, passed through, with copy-on-write on store objects.

    Args:
        root: the guest root directory (its realpath is the catalogue's key).
        index: the catalogue view; None mounts the tree as a plain passthrough.
        temp_names: names for the private copy while it is being made.
        writeback: turn on the kernel's writeback cache.
    """

    supports_dot_lookup = True
    enable_acl = True  # the kernel checks POSIX ACLs (stored as xattrs underneath)

    def __init__(
        self,
        root: str,
        index: SharedIndex | None,
        temp_names: TempNames,
        *,
        writeback: bool = True,
    ) -> None:
        super().__init__()
        self.enable_writeback_cache = writeback
        self.root = os.path.realpath(root)
        root_fd = os.open(self.root, _OPEN_DIR)
        st = os.fstat(root_fd)
        self.table = InodeTable(st.st_dev, st.st_ino, root_fd)
        self.index = index
        self.temp_names = temp_names
        self.stats = Stats()
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self._in_flight: set[bytes] = set()  # temporary names of breaks in progress
        self._breaks: dict[int, trio.Lock] = {}  # by FUSE inode, while a break may run

    def close(self) -> None:
        """Close every fd the table and handles hold (after unmounting)."""
        for fd in [h.fd for h in self._files.values()] + [h.fd for h in self._dirs.values()]:
            if fd >= 0:
                os.close(fd)
        self._files.clear()
        self._dirs.clear()
        os.close(self.table.root.dir_fd)
        if self.index is not None:
            self.index.close()

    # -- helpers -------------------------------------------------------------------------

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        if node.share is not None and self.index is not None:
            # Only the guest's own names count, and the object's ctime moves whenever
            # any guest links or unlinks it: neither may tell who else shares the file.
            attr.st_nlink = self.index.link_count(node.share)
            attr.st_ctime_ns = st.st_mtime_ns
        return attr

    def _stat_at(self, parent: Node, name: bytes) -> os.stat_result:
        return os.stat(name, dir_fd=parent.dir_fd, follow_symlinks=False)

    def _is_object(self, st: os.stat_result) -> bool:
        return (
            self.index is not None
            and st.st_nlink > 1
            and stat.S_ISREG(st.st_mode)
            and self.index.is_object(st.st_dev, st.st_ino, st.st_ctime_ns)
        )

    def _share(
        self, st: os.stat_result, parent: Node, name: bytes, parent_path: bytes | None = None
    ) -> Share | None:
        if self.index is None or not self._is_object(st):
            return None
        if parent_path is None:
            parent_path = self.table.path(parent)
        return self.index.share_of(parent_path + b"/" + name)

    def _known(self, parent: Node, name: bytes, st: os.stat_result) -> Node | None:
        """The node the entry led to before, if it still leads to the same inode.

        Its share stands, as every change of a name or a link group goes through this
        daemon, except what a unify run over the mounted guest did meanwhile: that is
        caught up with here (see _recheck), keeping the node and its inode number.
        """
        node = self.table.entry(parent.ino, name)
        if node is None or node.bino != st.st_ino or node.dev != st.st_dev:
            return None
        self._recheck(node)
        if node.share is None and self._is_object(st):
            # An object the catalogue's version did not announce yet (checked at most
            # every REFRESH_S): shared from now on all the same.
            self._reshare(node, parent, name, st)
            if node.share is None:
                return None
        if (parent.ino, name) not in node.names:
            self.table.name(node, parent.ino, name)
        return node

    def _node_at(
        self, parent: Node, name: bytes, st: os.stat_result, parent_path: bytes | None = None
    ) -> Node:
        """The node that `name` in `parent` leads to, made if new; the entry is recorded.

        `parent_path` is the parent's guest path when the caller knows it already.
        """
        node = self._known(parent, name, st)
        if node is not None:
            return node
        share = self._share(st, parent, name, parent_path)
        node = self.table.find((st.st_dev, st.st_ino, share))
        if node is None:
            node = self.table.add(st.st_dev, st.st_ino, st.st_mode, share)
            if self.index is not None:
                node.checked = self.index.generation
            if node.is_dir:
                try:
                    node.dir_fd = os.open(name, _OPEN_DIR, dir_fd=parent.dir_fd)
                except BaseException:
                    self.table.drop(node)
                    raise
        self.table.name(node, parent.ino, name)
        return node

    def _lookup(self, parent: Node, name: bytes) -> tuple[Node, pyfuse3.EntryAttributes]:
        """Lookup without counting it: callers add 1 once the kernel has the entry."""
        st = self._stat_at(parent, name)
        node = self._node_at(parent, name, st)
        return node, self._entry(node, st)

    def _current(self, inode: int) -> Node:
        """The node, brought up to date with what a unify run made of its file meanwhile."""
        node = self.table.get(inode)
        self._recheck(node)
        return node

    def _recheck(self, node: Node) -> None:
        """Work out again what a file the kernel knows is, after another process (a unify
        run over the mounted guest) committed to the catalogue: its inode may have been
        adopted as a store object, or its names replaced by links to one. Until the node
        says so, a write would meet the immutable flag, and the guest would see the
        store's link count."""
        index = self.index
        if index is None or node.is_dir or self._breaking(node):
            return
        index.refresh()
        if node.checked == index.generation:
            return
        node.checked = index.generation
        backing: set[tuple[int, int]] = set()
        found: tuple[Node, bytes, os.stat_result] | None = None
        for parent_ino, name in list(node.names):
            try:
                parent = self.table.get(parent_ino)
                st = self._stat_at(parent, name)
            except (KeyError, FileNotFoundError):
                continue
            backing.add((st.st_dev, st.st_ino))
            found = (parent, name, st)
        if found is None or len(backing) != 1 or not stat.S_ISREG(found[2].st_mode):
            return  # the kernel revalidates names that no longer lead here
        self._reshare(node, *found)

    def _reshare(self, node: Node, parent: Node, name: bytes, st: os.stat_result) -> None:
        """Point the node at what `name` leads to now, with its share, unless another node
        has that already. Same content and metadata (unify links only after comparing):
        the guest keeps its inode number; open handles keep reading the old inode."""
        share = self._share(st, parent, name)
        key = (st.st_dev, st.st_ino, share)
        if key != node.key and self.table.find(key) is None:
            self.table.rekey(node, st.st_dev, st.st_ino, share)

    def _where(self, node: Node) -> _cow.Where:
        """A live (directory fd, name) for a node, checked to still lead to it."""
        return self._located(node)[0]

    def _located(self, node: Node) -> tuple[_cow.Where, os.stat_result]:
        """`_where`, with the stat that checked it (one syscall, not two, for getattr)."""
        for parent_ino, name in list(node.names):
            try:
                parent = self.table.get(parent_ino)
                st = self._stat_at(parent, name)
            except (KeyError, FileNotFoundError):
                node.names.discard((parent_ino, name))
                continue
            if st.st_ino == node.bino and st.st_dev == node.dev:
                return _cow.Where(parent.dir_fd, name), st
            if self._breaking(node):
                # Mid-break a name may lead to the private copy already: same bytes,
                # same metadata, and open handles are re-pointed once the break is done.
                return _cow.Where(parent.dir_fd, name), st
            node.names.discard((parent_ino, name))
        raise OSError(errno.ESTALE, "the file has no name left")

    def _handle_fd(self, node: Node) -> int | None:
        """The fd of any open handle of the node: it reaches the inode without a lookup."""
        for fh in node.handles:
            return self._files[fh].fd
        return None

    def _breaking(self, node: Node) -> bool:
        lock = self._breaks.get(node.ino)
        return lock is not None and lock.locked()

    async def _settled(self, parent: Node, name: bytes) -> None:
        """Wait until a break in progress on the file `name` leads to is over."""
        node = self.table.entry(parent.ino, name)
        lock = None if node is None else self._breaks.get(node.ino)
        if lock is not None:
            async with lock:
                pass

    def _stat_node(self, node: Node) -> os.stat_result:
        if node.is_dir:
            return os.stat(node.dir_fd)
        fd = self._handle_fd(node)  # open handles follow the node, even across a break
        if fd is not None:
            return os.fstat(fd)
        return self._located(node)[1]

    def _open_node(self, node: Node, flags: int) -> int:
        try:
            where = self._where(node)
        except OSError:
            # Unlinked but still open: reopen through one of its open handles.
            for fh in node.handles:
                return os.open(f"/proc/self/fd/{self._files[fh].fd}", flags)
            raise
        fd = os.open(where.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=where.dir_fd)
        if os.fstat(fd).st_ino != node.bino and not self._breaking(node):
            os.close(fd)
            raise OSError(errno.ESTALE, "the name changed while being opened")
        return fd

    def _take_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _own(self, parent: Node, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> None:
        """Give a new entry the caller's owner, the parent's group under set-group-ID."""
        pst = os.stat(parent.dir_fd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=parent.dir_fd, follow_symlinks=False)
        if stat.S_ISREG(mode) and mode & _SETID:
            os.chmod(name, stat.S_IMODE(mode), dir_fd=parent.dir_fd)  # chown cleared them

    def _created(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        self.table.changed(parent.ino)
        node, attr = self._lookup(parent, name)
        node.lookups += 1
        return attr

    def _lock(self, node: Node) -> trio.Lock:
        lock = self._breaks.get(node.ino)
        if lock is None:
            lock = self._breaks[node.ino] = trio.Lock()
        return lock

    async def _break(self, node: Node, *, keep_data: bool = True) -> None:
        """Give the guest's file a private copy; the FUSE inode and open handles follow it."""
        async with self._lock(node):
            share = node.share
            if share is None or self.index is None:
                return
            # A name of its own (no group) is taken wherever the guest has moved it since.
            paths = [self._path_of(node)] if share.group is None else self.index.paths(share)
            root_fd = self.table.root.dir_fd
            temps = [self.temp_names.make() for _ in paths]
            self._in_flight.update(temps)
            try:
                st = await trio.to_thread.run_sync(
                    functools.partial(
                        _cow.break_links, root_fd, paths, node.bino, temps, keep_data=keep_data
                    )
                )
            finally:
                self._in_flight.difference_update(temps)
            self.index.dropped(paths)
            old_key = node.key
            self.table.rekey(node, st.st_dev, st.st_ino, None)
            self.stats.breaks += 1
            log.info("broke %s (%d names) from inode %d", paths[0], len(paths), old_key[1])
            for fh in list(node.handles):
                handle = self._files[fh]
                fresh = self._open_node(node, handle.flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL))
                # The same fd number now reads the copy: readers go on, seeing the same bytes.
                os.dup2(fresh, handle.fd, inheritable=False)
                os.close(fresh)
        self._breaks.pop(node.ino, None)

    def _path_of(self, node: Node) -> bytes:
        for parent_ino, name in node.names:
            return self.table.child_path(self.table.get(parent_ino), name)
        raise OSError(errno.ESTALE, "the file has no name left")

    def _shared_at(self, parent: Node, name: bytes) -> tuple[os.stat_result, Share | None]:
        st = self._stat_at(parent, name)
        node = self._known(parent, name, st)
        return st, node.share if node is not None else self._share(st, parent, name)

    # -- lookups and attributes -------------------------------------------------------

    @_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        if name in (b".", b".."):
            node = parent if name == b"." else self.table.parent_of(parent)
            node.lookups += 1
            return self._entry(node, os.stat(node.dir_fd))
        try:
            node, attr = self._lookup(parent, name)
        except FileNotFoundError:
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = 0  # a negative entry, cached by the kernel
            attr.entry_timeout = TIMEOUT
            return attr
        node.lookups += 1
        return attr

    @_handler
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.table.forget(ino, count)
            if node is not None and node.dir_fd >= 0:
                os.close(node.dir_fd)
                node.dir_fd = -1

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._current(inode)
        return self._entry(node, self._stat_node(node))

    @_handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._current(inode)
        changes = (
            fields.update_size
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
            or fields.update_mtime
        )
        if node.share is not None and changes and not self._no_change(node, attr, fields):
            await self._break(node, keep_data=not (fields.update_size and attr.st_size == 0))
        if node.share is not None:  # unchanged: nothing to write to the shared inode
            return self._entry(node, self._stat_node(node))
        # fchown(2) and friends arrive without a handle: any open handle of the file
        # reaches the same inode with one syscall and no name lookup (tar's fchown,
        # fchmod and futimens on the file it is writing; the kernel's flush of cached
        # times on an unlinked file).
        own_fd = self._files[fh].fd if fh is not None else None
        fd = own_fd if own_fd is not None or node.is_dir else self._handle_fd(node)
        where = None
        if fd is None and not node.is_dir:
            where = self._where(node)
        if fields.update_size:
            if own_fd is not None:  # ftruncate: the kernel names the writable handle
                os.ftruncate(own_fd, attr.st_size)
            else:
                wfd = self._open_node(node, os.O_WRONLY)
                try:
                    os.ftruncate(wfd, attr.st_size)
                finally:
                    os.close(wfd)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if fd is not None:
                os.fchown(fd, uid, gid)
            elif where is None:
                os.chown(f"/proc/self/fd/{node.dir_fd}", uid, gid)
            else:
                os.chown(where.name, uid, gid, dir_fd=where.dir_fd, follow_symlinks=False)
        if fields.update_mode:
            mode = stat.S_IMODE(attr.st_mode)
            if fd is not None:
                os.fchmod(fd, mode)
            elif where is None:
                os.chmod(f"/proc/self/fd/{node.dir_fd}", mode)
            elif stat.S_ISLNK(node.mode):
                raise FUSEError(errno.EOPNOTSUPP)
            else:
                os.chmod(where.name, mode, dir_fd=where.dir_fd)
        if fields.update_atime or fields.update_mtime:
            # utimensat's UTIME_OMIT is out of Python's reach: keep the other time as it is.
            both = fields.update_atime and fields.update_mtime
            now = None if both else os.fstat(fd) if fd is not None else self._stat_node(node)
            atime = attr.st_atime_ns if now is None or fields.update_atime else now.st_atime_ns
            mtime = attr.st_mtime_ns if now is None or fields.update_mtime else now.st_mtime_ns
            if fd is not None:
                os.utime(fd, ns=(atime, mtime))
            elif where is None:
                os.utime(f"/proc/self/fd/{node.dir_fd}", ns=(atime, mtime))
            else:
                os.utime(where.name, ns=(atime, mtime), dir_fd=where.dir_fd, follow_symlinks=False)
        st = os.fstat(fd) if fd is not None else self._stat_node(node)
        return self._entry(node, st)

    def _no_change(
        self, node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> bool:
        """True when a setattr would set what is there already.

        With the writeback cache the kernel flushes its cached times after a rename or an
        unlink of another name; breaking a shared file for that would copy for nothing.
        """
        st = self._stat_node(node)
        return (
            (not fields.update_size or attr.st_size == st.st_size)
            and (not fields.update_mode or stat.S_IMODE(attr.st_mode) == stat.S_IMODE(st.st_mode))
            and (not fields.update_uid or attr.st_uid == st.st_uid)
            and (not fields.update_gid or attr.st_gid == st.st_gid)
            and (not fields.update_atime or attr.st_atime_ns == st.st_atime_ns)
            and (not fields.update_mtime or attr.st_mtime_ns == st.st_mtime_ns)
        )

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        where = self._where(self.table.get(inode))
        return os.readlink(where.name, dir_fd=where.dir_fd)

    @_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only called without default_permissions; then check the mode bits as the kernel would.
        st = self._stat_node(self.table.get(inode))
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        if ctx.uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif ctx.gid == st.st_gid or st.st_gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return mode & bits == mode

    # -- directory entries ----------------------------------------------------------------

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        os.mknod(name, mode, rdev, dir_fd=parent.dir_fd)
        self._own(parent, name, mode, ctx)
        return self._created(parent, name)

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.dir_fd)
        self._own(parent, name, stat.S_IFDIR, ctx)
        return self._created(parent, name)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        os.symlink(target, name, dir_fd=parent.dir_fd)
        self._own(parent, name, stat.S_IFLNK, ctx)
        return self._created(parent, name)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.table.get(parent_inode)
        await self._settled(parent, name)
        st, share = self._shared_at(parent, name)
        if share is not None and self.index is not None:
            path = self.table.child_path(parent, name)
            await trio.to_thread.run_sync(
                _cow.unlink_shared, _cow.Where(parent.dir_fd, name), st.st_ino
            )
            self.index.dropped([path])
            self.stats.shared_unlinks += 1
        else:
            os.unlink(name, dir_fd=parent.dir_fd)
        node = self.table.unname(parent.ino, name)
        if node is not None and self._was_last(st, share):
            self.table.unkey(node)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.table.get(parent_inode)
        os.rmdir(name, dir_fd=parent.dir_fd)
        node = self.table.unname(parent.ino, name)
        if node is not None:
            self.table.unkey(node)

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self.table.get(parent_inode_old)
        new_parent = self.table.get(parent_inode_new)
        await self._settled(old_parent, name_old)
        await self._settled(new_parent, name_new)
        src_st, src_share = self._shared_at(old_parent, name_old)
        try:
            dst_st, dst_share = self._shared_at(new_parent, name_new)
        except FileNotFoundError:
            dst_st, dst_share = None, None
        src = _cow.Where(old_parent.dir_fd, name_old)
        dst = _cow.Where(new_parent.dir_fd, name_new)
        one_inode = dst_st is not None and (dst_st.st_dev, dst_st.st_ino) == (
            src_st.st_dev,
            src_st.st_ino,
        )
        if one_inode and flags & _linux.RENAME_NOREPLACE:
            raise FUSEError(errno.EEXIST)
        if one_inode and src_share == dst_share:
            if not flags & _linux.RENAME_EXCHANGE:
                return  # POSIX: renaming a name onto another name of the same file does nothing
        elif one_inode:
            # Two of the guest's files that unify linked to one object: the kernel would
            # do nothing, but the guest must see the source replace the target.
            await self._rename_between_groups(
                old_parent, name_old, new_parent, name_new, src_st, flags
            )
            return
        same = one_inode
        shared: list[tuple[_cow.Where, int]] = []
        if src_share is not None:
            shared.append((src, src_st.st_ino))
        if dst_share is not None and dst_st is not None and not same:
            shared.append((dst, dst_st.st_ino))
        old_path = self.table.child_path(old_parent, name_old)
        new_path = self.table.child_path(new_parent, name_new)
        if shared:
            await trio.to_thread.run_sync(_cow.rename_shared, src, dst, flags, shared)
            self.stats.shared_renames += 1
        else:
            _linux.rename_at(src.dir_fd, src.name, dst.dir_fd, dst.name, flags)
        if self.index is not None:
            if flags & _linux.RENAME_EXCHANGE:
                self.index.exchanged(old_path, new_path)
            else:
                self.index.renamed(old_path, new_path, is_dir=stat.S_ISDIR(src_st.st_mode))
        moved = self.table.unname(old_parent.ino, name_old)
        replaced = self.table.unname(new_parent.ino, name_new)
        if moved is not None:
            self.table.name(moved, new_parent.ino, name_new)
        if flags & _linux.RENAME_EXCHANGE and replaced is not None:
            self.table.name(replaced, old_parent.ino, name_old)
        elif replaced is not None and dst_st is not None and self._was_last(dst_st, dst_share):
            self.table.unkey(replaced)

    def _was_last(self, st: os.stat_result, share: Share | None) -> bool:
        """After removing a name that `st` described: is the guest's file gone?"""
        if share is None or self.index is None:
            return st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode)
        return share.group is None or not self.index.paths(share)

    async def _rename_between_groups(
        self,
        old_parent: Node,
        name_old: bytes,
        new_parent: Node,
        name_new: bytes,
        src_st: os.stat_result,
        flags: int,
    ) -> None:
        assert self.index is not None
        old_path = self.table.child_path(old_parent, name_old)
        new_path = self.table.child_path(new_parent, name_new)
        moved = self.table.unname(old_parent.ino, name_old)
        replaced = self.table.unname(new_parent.ino, name_new)
        if flags & _linux.RENAME_EXCHANGE:
            self.index.exchanged(old_path, new_path)  # same bytes: only the groups swap
            if replaced is not None:
                self.table.name(replaced, old_parent.ino, name_old)
        else:
            where = _cow.Where(old_parent.dir_fd, name_old)
            await trio.to_thread.run_sync(_cow.unlink_shared, where, src_st.st_ino)
            self.index.renamed(old_path, new_path, is_dir=False)
            self.stats.shared_renames += 1
        if moved is not None:
            self.table.name(moved, new_parent.ino, name_new)

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._current(inode)
        parent = self.table.get(new_parent_inode)
        if node.share is not None:
            await self._break(node)  # a new name must join the guest's file, not the store's
        where = self._where(node)
        os.link(
            where.name,
            new_name,
            src_dir_fd=where.dir_fd,
            dst_dir_fd=parent.dir_fd,
            follow_symlinks=False,
        )
        return self._created(parent, new_name)

    # -- files ------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        if self.enable_writeback_cache:
            # The kernel reads through write-only handles to fill partly written pages,
            # and it computes append offsets itself (libfuse passthrough_ll's lo_open).
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        # O_DIRECT stays the kernel's business: our buffers are not aligned for the disk.
        return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT)

    def _file_info(self, fd: int, node: Node, flags: int) -> pyfuse3.FileInfo:
        fh = self._take_fh()
        self._files[fh] = _File(fd, node, flags)
        node.handles.add(fh)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._current(inode)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if node.share is not None and writing:
            await self._break(node, keep_data=not flags & os.O_TRUNC)
        flags = self._open_flags(flags)
        if node.share is not None:
            flags |= os.O_NOATIME  # reading must not touch the object other guests share
        fd = self._open_node(node, flags)
        return self._file_info(fd, node, flags)

    @_handler
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.table.get(parent_inode)
        if not flags & os.O_EXCL:
            try:
                node, _ = self._lookup(parent, name)
            except FileNotFoundError:
                pass
            else:  # someone made it since the kernel looked: open the existing file
                info = await self.open(node.ino, flags, ctx)
                node.lookups += 1
                return info, self._entry(node, self._stat_node(node))
        open_flags = self._open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os.open(name, open_flags | os.O_CLOEXEC, stat.S_IMODE(mode), dir_fd=parent.dir_fd)
        self.table.changed(parent.ino)
        try:
            pst = os.stat(parent.dir_fd)
            gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
            os.fchown(fd, ctx.uid, gid)
            if mode & _SETID:
                os.fchmod(fd, stat.S_IMODE(mode))
            st = os.fstat(fd)
            node = self._node_at(parent, name, st)
        except BaseException:
            os.close(fd)
            raise
        # A new inode carries no file capability: the kernel's probe before each write
        # is answered from memory (setxattr clears this).
        node.no_caps = True
        node.lookups += 1
        return self._file_info(fd, node, open_flags), self._entry(node, st)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._files[fh].fd, size, off)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self._files[fh].fd, buf, off)

    @_handler
    async def flush(self, fh: int) -> None:
        if fh not in self._files:  # data went to the backing file at each write already
            raise FUSEError(errno.EBADF)

    @_handler
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        handle.node.handles.discard(fh)
        os.close(handle.fd)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._files[fh].fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    # -- directories ----------------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.table.get(inode)
        fh = self._take_fh()
        self._dirs[fh] = _Dir(node)
        return fh

    def _dir_fd(self, handle: _Dir) -> int:
        """A readable fd of the handle's directory (listdir and fsync cannot use O_PATH)."""
        if handle.fd < 0:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            handle.fd = os.open(".", flags, dir_fd=handle.node.dir_fd)
        return handle.fd

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        parent = handle.node
        if start_id == 0 or handle.entries is None:
            # One listing per pass, so an offset names the same entry for the whole pass
            # (the inode number cannot serve: hardlinks repeat it in one directory). It
            # is kept until a name in the directory changes, which only we can do.
            if parent.listing is None:
                names = [os.fsencode(n) for n in os.listdir(self._dir_fd(handle))]
                ours = [n for n in names if self.temp_names.is_ours(n)]
                if ours:  # breaks in progress, or copies a killed daemon left
                    leftovers = [n for n in ours if n not in self._in_flight]
                    _cow.remove_leftovers(parent.dir_fd, leftovers)
                    names = [n for n in names if n not in ours]
                parent.listing = names
            handle.entries = parent.listing
        entries = handle.entries
        parent_path: bytes | None = None
        for first in range(start_id, len(entries), _READDIR_BATCH):
            batch: list[tuple[int, bytes, os.stat_result, Node | None]] = []
            for index in range(first, min(first + _READDIR_BATCH, len(entries))):
                name = entries[index]
                try:
                    st = self._stat_at(parent, name)
                except FileNotFoundError:
                    continue
                batch.append((index, name, st, self._known(parent, name, st)))
            candidates = [
                (st.st_dev, st.st_ino, st.st_ctime_ns)
                for _, _, st, known in batch
                if known is None and st.st_nlink > 1 and stat.S_ISREG(st.st_mode)
            ]
            if candidates and self.index is not None:
                # One catalogue query for the batch instead of one per file seen first.
                self.index.prefetch(candidates)
                if parent_path is None:
                    with contextlib.suppress(FileNotFoundError):
                        parent_path = self.table.path(parent)
            for index, name, st, known in batch:
                node = known or self._node_at(parent, name, st, parent_path)
                if not pyfuse3.readdir_reply(token, name, self._entry(node, st), index + 1):
                    if node.lookups == 0:  # made just now for this entry: never sent
                        if node.dir_fd >= 0:
                            os.close(node.dir_fd)
                        self.table.drop(node)
                    return
                node.lookups += 1

    @_handler
    async def releasedir(self, fh: int) -> None:
        fd = self._dirs.pop(fh).fd
        if fd >= 0:
            os.close(fd)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = self._dir_fd(self._dirs[fh])
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.table.root.dir_fd)
        out = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, name, getattr(sv, name))
        return out

    # -- extended attributes --------------------------------------------------------------

    def _xattr_target(self, node: Node) -> tuple[int | str, bool]:
        """Where to reach the node's own xattrs, and whether to follow the last component.

        A file is reached as its parent's fd path plus its name, so a symlink is not
        followed and nothing is opened; a directory through its fd's magic link (which
        must be followed); a file with no name left through an open handle.
        """
        if node.is_dir:
            return f"/proc/self/fd/{node.dir_fd}", True
        try:
            where = self._where(node)
        except OSError:
            for fh in node.handles:
                return self._files[fh].fd, True
            raise
        return f"/proc/self/fd/{where.dir_fd}/{os.fsdecode(where.name)}", False

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.table.get(inode)
        if name == _CAPS and node.no_caps:
            # The kernel asks before every write, to drop file capabilities; only we
            # can add them, so a known "none" stays true until setxattr says otherwise.
            raise FUSEError(pyfuse3.ENOATTR)
        try:
            target, follow = self._xattr_target(node)
            return os.getxattr(target, name, follow_symlinks=follow)
        except OSError as exc:
            if name == _CAPS and exc.errno == pyfuse3.ENOATTR:
                node.no_caps = True
            raise

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self.table.get(inode)
        target, follow = self._xattr_target(node)
        names = os.listxattr(target, follow_symlinks=follow)
        return [os.fsencode(n) for n in names]

    @_handler
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self._current(inode)
        if node.share is not None:
            await self._break(node)
        node.no_caps = False
        target, follow = self._xattr_target(node)
        os.setxattr(target, name, value, follow_symlinks=follow)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._current(inode)
        if node.share is not None:
            await self._break(node)
        target, follow = self._xattr_target(node)
        os.removexattr(target, name, follow_symlinks=follow)
