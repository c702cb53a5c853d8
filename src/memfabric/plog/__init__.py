"""MemPlog: persistent append-only logs on the pool (issue 11). See DESIGN.md, "MemPlog"."""
