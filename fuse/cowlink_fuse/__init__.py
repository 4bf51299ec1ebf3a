"""cowlink_fuse: the copy-on-write FUSE layer through which guests see their unified trees."""
