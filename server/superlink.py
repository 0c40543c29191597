"""``fedvlp-server superlink -- FLOWER_SUPERLINK_ARGS``: Flower's SuperLink with a database that bears many sites.

With ``--database FILE`` Flower 1.41 keeps both its link state (registered SuperNodes, runs, messages)
and its object store (the messages' contents: every model array a site sends or receives) in that
SQLite file, opened with ``busy_timeout = 5000`` ms. With two or three sites uploading their replies at
once on a loaded machine a write waits longer than that for the lock, fails with "database is locked",
and the request with HTTP 500; a 500 on the ServerApp's ``pull-messages`` ends the run (seen in this
project's end-to-end tests). This command runs the stock ``flower-superlink`` with its arguments
unchanged and two settings changed, in its own process only:

- the object store stays in memory (as without ``--database``): arrays only live while a round moves
  them, and a restarted SuperLink's ServerApp is gone with them anyway; what must survive a restart
  (registrations, runs) stays in the database, which now sees small writes only;
- the database's busy timeout is 60 s.

It relies on two names of Flower 1.41's internals (pinned in pyproject.toml):
``flwr.superlink.main.get_objectstore_linkstate_factories`` and ``flwr.supercore.sql_mixin.SQLITE_PRAGMAS``.
"""

from __future__ import annotations

import sys

BUSY_TIMEOUT_MS = 60_000


def _patch_flower() -> None:
    import flwr.superlink.main as superlink_main
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore import sql_mixin
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory

    sql_mixin.SQLITE_PRAGMAS = tuple((name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
                                     for name, value in sql_mixin.SQLITE_PRAGMAS)
    flower_factories = superlink_main.get_objectstore_linkstate_factories

    def factories(database: str, federation_manager):
        if database == FLWR_IN_MEMORY_DB_NAME:
            return flower_factories(database, federation_manager)
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    superlink_main.get_objectstore_linkstate_factories = factories


def main(args: list[str]) -> None:
    """Run ``flower-superlink ARGS`` in this process, with the settings above."""
    _patch_flower()
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *args]
    flower_superlink()
