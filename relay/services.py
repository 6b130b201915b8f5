"""The relay's public surface: what its tasks and command, the outbox's commit hook and other apps call.

The code lives by concern in the other modules of this package (README.md, "Code layout").
"""

from .dead_letters import dead_letters_retry
from .publish import relay_publish_batch
from .run import relay_run
from .wake import relay_follow, relay_wake

__all__ = ["dead_letters_retry", "relay_follow", "relay_publish_batch", "relay_run", "relay_wake"]
