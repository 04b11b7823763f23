"""pplex-room-router: keeps every message of one game room on one upstream worker.

The plugin itself is `room_router.plugin`, registered under the `pplex.plugins`
entry point group as `rooms`.
"""
