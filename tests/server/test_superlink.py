"""``fedvlp-server superlink``: Flower's SuperLink keeps its state in the database and the message objects in
memory, with a database busy timeout long enough for several sites uploading at once."""

from __future__ import annotations

import flwr.superlink.main as superlink_main
from flwr.supercore import sql_mixin
from flwr.superlink.federation import NoOpFederationManager

from server.superlink import BUSY_TIMEOUT_MS, _patch_flower


def test_the_database_keeps_the_link_state_and_the_objects_stay_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(superlink_main, "get_objectstore_linkstate_factories",
                        superlink_main.get_objectstore_linkstate_factories)  # restored after the test
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    _patch_flower()
    objects, link = superlink_main.get_objectstore_linkstate_factories(str(tmp_path / "state.db"),
                                                                         NoOpFederationManager())
    assert type(objects.store()).__name__ == "InMemoryObjectStore"
    assert type(link.state()).__name__ == "SqlLinkState" and (tmp_path / "state.db").is_file()
    assert link.state().object_store is objects.store()
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == str(BUSY_TIMEOUT_MS)
    memory, _ = superlink_main.get_objectstore_linkstate_factories(":flwr-in-memory:", NoOpFederationManager())
    assert type(memory.store()).__name__ == "InMemoryObjectStore"  # without --database: Flower's own choice
