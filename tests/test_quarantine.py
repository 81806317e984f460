"""The quarantine store on its own: crash safety, index rebuild, ids, permissions, failures."""
import errno
import io
import os
import stat
import time

import pytest

from scanmilter import quarantine as Q
from scanmilter import quarantine_cli as QC


def put(store, data=b"Subject: x\r\n\r\nbody\r\n", **meta):
    return store.put(io.BytesIO(data), {"sender": "a@b.test", "recipients": ["c@d.test"], "reason": "spam",
                                        "score": 9.0, **meta})


def test_put_get_message_and_permissions(tmp_path):
    store = Q.Store(str(tmp_path / "q"))
    entry_id = put(store)
    assert Q.valid_id(entry_id)
    assert store.message(entry_id) == b"Subject: x\r\n\r\nbody\r\n"
    meta = store.get(entry_id).meta
    assert meta["size"] == 20 and meta["reason"] == "spam" and meta["released"] == []
    assert stat.S_IMODE(os.stat(tmp_path / "q").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "q" / "entries").st_mode) == 0o700
    for name in os.listdir(tmp_path / "q" / "entries"):
        assert stat.S_IMODE(os.stat(tmp_path / "q" / "entries" / name).st_mode) == 0o600


def test_ids_are_random_and_validated(tmp_path):
    store = Q.Store(str(tmp_path / "q"))
    assert len({put(store) for _ in range(20)}) == 20
    for bad in ("../x", "0" * 23, "g" * 24, "0" * 24 + "/..", ""):
        with pytest.raises(Q.NotFound):
            store.get(bad)


def test_a_writer_killed_before_rename_leaves_no_entry_and_no_garbage(tmp_path, monkeypatch):
    store = Q.Store(str(tmp_path / "q"))
    real_rename = os.rename

    def crash(src, dst, **kw):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt       # the process dies between writing and publishing
        return real_rename(src, dst, **kw)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        put(store)
    monkeypatch.setattr(os, "rename", real_rename)
    assert store.select() == [] and list(store.ids_on_disk()) == []
    left = os.listdir(tmp_path / "q" / "entries")
    assert left and all(n.endswith(".msg") for n in left)      # the unpublished message file
    # a temp file of a writer killed by SIGKILL mid-write
    (tmp_path / "q" / "entries" / ".tmp-abc.msg.1234").write_bytes(b"half")
    assert Q.Store(str(tmp_path / "q")).recover(min_age=0) == 2
    assert os.listdir(tmp_path / "q" / "entries") == []


def test_recover_spares_young_temp_files_of_a_running_writer(tmp_path):
    store = Q.Store(str(tmp_path / "q"))
    (tmp_path / "q" / "entries" / ".tmp-abc.msg.1234").write_bytes(b"being written")
    assert store.recover() == 0


def test_disk_full_raises_and_leaves_nothing(tmp_path, monkeypatch):
    store = Q.Store(str(tmp_path / "q"))

    class Full(io.BytesIO):
        def read(self, n=-1):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(Q.StoreError, match="No space left"):
        store.put(Full(), {"reason": "spam"})
    assert os.listdir(tmp_path / "q" / "entries") == []


def test_symlinked_entries_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "q" / "entries")
    with pytest.raises(Q.StoreError, match="not a directory"):
        Q.Store(str(tmp_path / "q"))


def test_index_is_rebuilt_from_the_files(tmp_path):
    store = Q.Store(str(tmp_path / "q"))
    ids = {put(store, reason="virus"), put(store)}
    del store
    for name in os.listdir(tmp_path / "q"):
        if name.startswith("index.sqlite"):
            os.unlink(tmp_path / "q" / name)
    again = Q.Store(str(tmp_path / "q"))
    assert {e.id for e in again.select()} == ids           # rebuilt on first listing
    assert [e.meta["reason"] for e in again.select(reason="virus")] == ["virus"]
    assert again.reindex() == 2


def test_filters_delete_purge_and_stats(tmp_path):
    store = Q.Store(str(tmp_path / "q"))
    old = put(store, time=time.time() - 40 * 86400, sender="x@old.test")
    new = put(store, recipients=["boss@example.com"])
    assert [e.id for e in store.select()] == [new, old]                    # newest first
    assert [e.id for e in store.select(sender="OLD.test")] == [old]
    assert [e.id for e in store.select(recipient="boss@")] == [new]
    assert [e.id for e in store.select(since=time.time() - 86400)] == [new]
    assert [e.id for e in Q.purge(store, 30 * 86400, dry_run=True)] == [old]
    assert len(store.select()) == 2
    Q.purge(store, 30 * 86400)
    assert [e.id for e in store.select()] == [new]
    assert store.stats()["by_reason"]["spam"]["entries"] == 1
    store.delete(new)
    with pytest.raises(Q.NotFound):
        store.delete(new)
    # what the daemon exports as scanmilter_quarantine_actions_total; a failed delete counts nothing
    assert store.tallies() == {"release": 0, "delete": 1, "purge": 1, "learn_ham": 0, "learn_spam": 0}
    assert Q.Store(str(tmp_path / "q")).tallies()["delete"] == 1     # shared between processes


def test_tallies_survive_a_reindex(tmp_path):
    store = Q.Store(str(tmp_path / "q"))
    store.delete(put(store))
    store.reindex()
    assert store.tallies()["delete"] == 1


def test_release_failure_leaves_the_entry_intact(tmp_path):
    store = Q.Store(str(tmp_path / "q"))
    entry_id = put(store)
    with pytest.raises(Q.ReleaseError, match="release endpoint"):
        Q.release(store, entry_id, ("127.0.0.1", 9), "me", timeout=2)        # nothing listens on port 9
    assert store.get(entry_id).meta["released"] == []
    assert store.tallies()["release"] == 0
    with pytest.raises(Q.ReleaseError, match="not among the entry's recipients"):
        Q.release(store, entry_id, ("127.0.0.1", 9), "me", to=["stranger@x.test"])


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("2w", 1209600)])
def test_durations(text, seconds):
    assert QC.duration(text) == seconds


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    from scanmilter import cli
    conf = tmp_path / "s.toml"
    conf.write_text(f'quarantine_directory = "{tmp_path}/q"\n')
    assert cli.main(["quarantine", "purge", "--older-than", "soon", "-c", str(conf)]) == 2
    assert cli.main(["quarantine", "show", "../../etc/passwd", "-c", str(conf)]) == 1
    assert cli.main(["quarantine", "list", "-c", str(conf)]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "not a duration" in out.err and "not a quarantine id" in out.err
    assert "Quarantine is empty" in out.out
