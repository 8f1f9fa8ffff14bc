"""Redis I/O for models: the key layout's users, the Lua scripts, the lock, job results."""
