"""Run a command with its file descriptor limit (soft and hard) set: `python tests/fdlimit.py N CMD...`.

For the tests of what pplex does when it runs out of descriptors: the limit is
set here, then this process becomes the command (exec), so the pid is the same.
"""
import os
import resource
import sys

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
os.execvp(sys.argv[2], sys.argv[2:])
