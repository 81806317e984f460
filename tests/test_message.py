import os

from scanmilter.message import Message, Seen, Spool


def test_spool_stays_in_memory_below_the_threshold():
    s = Spool(memory_limit=100, size_limit=1000)
    s.write(b"a" * 100)
    assert not s.on_disk and s.getvalue() == b"a" * 100


def test_spool_rolls_over_to_an_unnamed_file(tmp_path):
    s = Spool(memory_limit=10, size_limit=1000, directory=str(tmp_path))
    s.write(b"0123456789")
    s.write(b"abc")
    assert s.on_disk
    assert os.listdir(tmp_path) == []          # no name in the directory, ever
    assert s.getvalue() == b"0123456789abc"
    s.close()


def test_over_the_size_limit_keeps_counting_but_stops_storing():
    s = Spool(memory_limit=4, size_limit=8)
    for _ in range(5):
        s.write(b"xyz")
    assert s.oversize and s.received == 15 and s.stored == 8
    assert s.getvalue() == b"xyzxyzxy"


def test_readers_are_independent_and_limited(tmp_path):
    s = Spool(memory_limit=4, size_limit=100, directory=str(tmp_path))
    s.write(b"hello world")
    a, b = s.reader(), s.reader(5)
    assert a.read(3) == b"hel"
    assert b.read() == b"hello"
    assert a.read() == b"lo world"
    a.close()
    b.close()


def test_reader_outlives_the_spool(tmp_path):
    s = Spool(memory_limit=1, size_limit=100, directory=str(tmp_path))
    s.write(b"data")
    r = s.reader()
    s.close()                                  # a late engine thread still reads its own descriptor
    assert r.read() == b"data"
    r.close()


def test_message_records_headers_byte_exact_and_keeps_the_ones_asked_for():
    m = Message("a@b", Spool(1024, 1024))
    keep = lambda name: name.startswith("x-spam-") or name == "subject"   # noqa: E731
    m.add_header("Subject", b" hi \xff", keep)
    m.add_header("X-Spam-Flag", b" YES", keep)
    m.add_header("Received", b" from x", keep)
    m.add_header("x-spam-flag", b"YES", keep)
    m.end_headers()
    m.add_body(b"body\r\n")
    assert m.spool.getvalue() == (b"Subject: hi \xff\r\nX-Spam-Flag: YES\r\nReceived: from x\r\n"
                                  b"x-spam-flag:YES\r\n\r\nbody\r\n")
    assert m.seen == [Seen("Subject", 1, b" hi \xff"), Seen("X-Spam-Flag", 1, b" YES"), Seen("x-spam-flag", 2, b"YES")]
    assert m.header_count == 4


def test_recipients_keep_their_raw_form():
    m = Message("a@b", Spool(10, 10))
    m.add_recipient("<Bob@Example.com>")
    assert m.recipients == ["Bob@Example.com"] and m.raw_recipients == {"Bob@Example.com": "<Bob@Example.com>"}


def test_past_the_verdict_header_cap_nothing_more_is_kept():
    m = Message("a@b", Spool(1 << 20, 8 << 20), header_limit=1000, verdict_limit=50)
    keep = lambda name: name.startswith("x-spam-") or name == "subject"   # noqa: E731
    m.add_header("Subject", b" hi", keep)
    for i in range(100_000):
        m.add_header(f"X-Spam-Flood-{i}", b" x", keep)
        assert len(m.seen) <= 51 and len(m._counts) <= 51          # bounded while the flood goes on
    assert m.over_limit == "verdict_header_limit" and m.seen == [] and m.verdict_count == 51
    assert m.header_count == 100_001
    m.end_headers()
    assert m.spool.getvalue().count(b"\r\n") == 100_002              # still read and stored, within the spool's limit


def test_past_the_header_count_cap_nothing_more_is_kept():
    m = Message("a@b", Spool(1 << 20, 1 << 20), header_limit=100, verdict_limit=50)
    keep = lambda name: True                                          # noqa: E731
    for i in range(100):
        m.add_header(f"X-Many-{i}", b" v", keep)
    assert m.over_limit == "" and len(m.seen) == 100                 # at the cap: still fine
    for i in range(100, 10_000):
        m.add_header(f"X-Many-{i}", b" v", keep)
        assert len(m.seen) <= 100 and len(m._counts) <= 100
    assert m.over_limit == "header_count_limit" and m.header_count == 10_000


def test_past_a_cap_the_spool_keeps_its_own_size_limit():
    m = Message("a@b", Spool(memory_limit=1000, size_limit=5000), header_limit=10, verdict_limit=10)
    for i in range(1000):
        m.add_header("X-Many", b" " + b"v" * 50, lambda name: True)
    assert m.over_limit == "header_count_limit"
    assert m.spool.stored == 5000 and m.spool.oversize and m.size > 50_000
    m.close()
