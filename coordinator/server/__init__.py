"""The coordinator's round loop (`Server`) and its rooms: `loop` (the loop and message dispatch),
`tasks` (task messages and the open round's state), `intake` (update intake), `close` (aggregate or
fail a round), `context` (what they share), `setup` (parts from settings), `services` (bundle server
and rollouts beside the rounds)."""

from fedclip.coordinator.server.loop import Server

__all__ = ["Server"]
