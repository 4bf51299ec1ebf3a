"""The inode table: FUSE inode numbers, the backing inodes behind them, names and lookup counts.

No pyfuse3 and no I/O here: _ops asks, this module remembers. It runs on the trio thread
only, so it needs no locks.

A FUSE inode is *not* the backing inode. Two link groups of one guest may be linked to
the same store object and must still look like two files, and a copy-on-write break
swaps the backing inode while the guest's inode number has to stay the same. So each
node is keyed by (dev, backing ino, share) and carries a number of its own, handed out
once and never reused.

Notes:
    A directory has one name, so its path in the guest is found by walking up its
    parents. A file keeps every (parent, name) the kernel learned it by; any of them
    reaches it through the parent's directory fd, so paths near PATH_MAX never appear.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

ROOT_INODE = 1


@dataclass(frozen=True)
class Share:
    """Why a file is shared: it is a store object, and the guest's link group of this name.

    Attributes:
        group: the catalogue's link group; None for a name the catalogue does not know,
            which is then a file of its own.
        path: that name's guest path when `group` is None.
    """

    group: int | None
    path: bytes | None = None


Key = tuple[int, int, Share | None]


@dataclass(eq=False)
class Node:
    """One inode as the kernel knows it.

    Attributes:
        ino: the FUSE inode number, stable for the node's life.
        dev, bino: the backing inode; changes when a shared file is broken.
        mode: the backing file type (S_IFMT bits).
        share: set while the backing inode is a store object.
        names: the (parent ino, name) entries known to lead here.
        lookups: the kernel's lookup count; the node goes when it drops to zero.
        dir_fd: an O_PATH fd of a directory, used as `dir_fd` for every *at() call in it.
        handles: open file handles, re-pointed when the file is broken.
        no_caps: the file is known to carry no security.capability xattr.
        listing: a directory's names as last read; None once anything changed in it.
        checked: the SharedIndex generation at which `share` was last worked out.
    """

    ino: int
    dev: int
    bino: int
    mode: int
    share: Share | None
    names: set[tuple[int, bytes]] = field(default_factory=set)
    lookups: int = 0
    dir_fd: int = -1
    handles: set[int] = field(default_factory=set)
    no_caps: bool = False
    listing: list[bytes] | None = None
    checked: int = 0
    is_dir: bool = field(init=False)  # from `mode`, which a node keeps for life

    def __post_init__(self) -> None:
        self.is_dir = stat.S_ISDIR(self.mode)

    @property
    def key(self) -> Key:
        return (self.dev, self.bino, self.share)


class InodeTable:
    """Nodes by FUSE inode number and by backing key, and the entries that name them."""

    def __init__(self, root_dev: int, root_ino: int, root_fd: int) -> None:
        self._next = ROOT_INODE + 1
        self.root = Node(ROOT_INODE, root_dev, root_ino, stat.S_IFDIR, None, dir_fd=root_fd)
        self.root.lookups = 1  # never forgotten
        self._nodes: dict[int, Node] = {ROOT_INODE: self.root}
        self._by_key: dict[Key, Node] = {self.root.key: self.root}
        self._entries: dict[tuple[int, bytes], int] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, ino: int) -> Node:
        """The node; KeyError when the kernel names one we never gave or already forgot."""
        return self._nodes[ino]

    def find(self, key: Key) -> Node | None:
        return self._by_key.get(key)

    def entry(self, parent: int, name: bytes) -> Node | None:
        ino = self._entries.get((parent, name))
        return None if ino is None else self._nodes.get(ino)

    def add(self, dev: int, bino: int, mode: int, share: Share | None) -> Node:
        node = Node(self._next, dev, bino, stat.S_IFMT(mode), share)
        self._next += 1
        self._nodes[node.ino] = node
        self._by_key[node.key] = node
        return node

    def name(self, node: Node, parent: int, name: bytes) -> None:
        """Record that `name` in `parent` leads to `node`."""
        old = self.entry(parent, name)
        if old is not None and old is not node:
            old.names.discard((parent, name))
        if node.is_dir:
            for entry in node.names:
                self._entries.pop(entry, None)
            node.names.clear()
        node.names.add((parent, name))
        self._entries[(parent, name)] = node.ino

    def unname(self, parent: int, name: bytes) -> Node | None:
        """Forget that `name` in `parent` exists; the node it led to, if known."""
        self.changed(parent)
        ino = self._entries.pop((parent, name), None)
        node = None if ino is None else self._nodes.get(ino)
        if node is not None:
            node.names.discard((parent, name))
        return node

    def changed(self, parent: int) -> None:
        """A name was added to or removed from the directory `parent`."""
        node = self._nodes.get(parent)
        if node is not None:
            node.listing = None

    def unkey(self, node: Node) -> None:
        """The backing inode is gone (its last name removed): a new file that gets the
        same inode number from the filesystem must get a new node, not this one."""
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]

    def rekey(self, node: Node, dev: int, bino: int, share: Share | None) -> None:
        """The node's backing inode changed (a break): same FUSE inode, new key."""
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.dev, node.bino, node.share = dev, bino, share
        self._by_key[node.key] = node

    def forget(self, ino: int, count: int) -> Node | None:
        """Drop `count` lookups; the node if it is now gone (the caller closes its fd)."""
        node = self._nodes.get(ino)
        if node is None or node is self.root:
            return None
        node.lookups -= count
        if node.lookups > 0:
            return None
        self.drop(node)
        return node

    def drop(self, node: Node) -> None:
        self._nodes.pop(node.ino, None)
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        for entry in node.names:
            if self._entries.get(entry) == node.ino:
                del self._entries[entry]
        node.names.clear()

    def parent_of(self, node: Node) -> Node:
        """A directory's parent (the root is its own)."""
        for parent, _ in node.names:
            found = self._nodes.get(parent)
            if found is not None:
                return found
        return self.root

    def path(self, node: Node) -> bytes:
        """A directory's guest path, b"" for the root, else b"/a/b"."""
        parts: list[bytes] = []
        seen = 0
        while node is not self.root:
            if not node.names or seen > 4096:
                raise FileNotFoundError("directory no longer reachable")
            parent, name = next(iter(node.names))
            parts.append(name)
            node = self._nodes[parent]
            seen += 1
        return b"".join(b"/" + p for p in reversed(parts))

    def child_path(self, parent: Node, name: bytes) -> bytes:
        return self.path(parent) + b"/" + name
