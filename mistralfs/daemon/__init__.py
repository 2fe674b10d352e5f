"""The process layer: the `mount`, `unmount` and `status` commands (commands.py,
status.py), the daemon's main loop around the filesystem (serve.py), its status
socket (control.py), systemd's notifications (systemd.py), the garbage collector's
settings (collector.py), and where pid and state files live (state.py).

`fs/` knows nothing of processes; this package puts a filesystem in one.
"""
