"""replay's ChainVerifier frames the hashed columns its own way (cached chunks, precomputed
length prefixes): it must hash the very bytes runstate.events.event_hash does, whatever the
columns hold, and still name the first event whose link does not hold."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from runstate.audit.replay import CHAIN_BROKEN, MAX_CACHED_CHUNKS, SCAN_COLUMNS, ChainVerifier
from runstate.events import GENESIS, event_hash

ids = st.uuids().map(str)
texts = st.none() | st.text(max_size=40)  # names and types as a client or a migration may write them
# Payloads and digests across the 1024-byte edge of the precomputed length prefixes, any characters.
payloads = st.text(min_size=0, max_size=1500) | st.text(alphabet="é€😀", min_size=300, max_size=700)
digests = st.none() | st.binary(min_size=0, max_size=1100)


@st.composite
def stream_rows(draw: st.DrawFn) -> list[list[object]]:
    """A stream's rows as SCAN_COLUMNS reads them, without their hashes yet."""
    stream = draw(ids)
    return [
        [stream, seq, draw(texts), draw(texts), draw(ids), draw(st.none() | ids), draw(texts), draw(texts),
         draw(texts), draw(st.none() | ids), draw(texts), draw(st.none() | st.integers(0, 2**31 - 1)),
         draw(st.none() | st.integers(0, 2**63 - 1)), draw(digests), None, draw(payloads)]
        for seq in range(1, draw(st.integers(1, 4)) + 1)
    ]


def chain(rows: list[list[object]]) -> list[tuple[object, ...]]:
    """The rows with the hashes event_hash gives them, chained from GENESIS."""
    previous, out = GENESIS, []
    for row in rows:
        (sid, seq, stream_type, event_type, cid, tid, status, state_type, state_name, stid, topic, partition,
         offset, digest, _, payload) = row
        previous = event_hash(
            previous, stream_id=sid, seq=seq, stream_type=stream_type, event_type=event_type, command_id=cid,
            transition_id=tid, status=status, state_type=state_type, state_name=state_name, state_id=stid,
            source_topic=topic, source_partition=partition, source_offset=offset, source_digest=digest,
            payload=payload)
        out.append((*row[:14], previous, row[15]))
    return out


def test_the_scan_reads_the_columns_the_chain_unpacks():
    assert len(SCAN_COLUMNS.split(",")) == 16


@settings(max_examples=300, deadline=None)
@given(st.lists(stream_rows(), min_size=1, max_size=4, unique_by=lambda rows: rows[0][0]))
def test_every_link_event_hash_makes_holds_and_a_changed_column_breaks_it(streams):
    verifier = ChainVerifier()
    for rows in streams:
        assert [verifier.check(row) for row in chain(rows)] == [None] * len(rows)

    rows = chain(streams[0])
    for column in range(16):
        if column in (0, 1, 14):  # the stream and seq name the finding; 14 is the stored hash itself
            continue
        changed = [list(row) for row in rows]
        value = changed[-1][column]
        changed[-1][column] = (
            (value or 0) + 1 if column in (11, 12) else (value or b"") + b"x" if column == 13
            else (value or "") + "x")
        fresh = ChainVerifier()
        found = [fresh.check(tuple(row)) for row in changed]
        assert found[:-1] == [None] * (len(rows) - 1), column
        assert found[-1] is not None and found[-1].differences == CHAIN_BROKEN, column
        assert (str(found[-1].stream_id), found[-1].seq) == (rows[-1][0], rows[-1][1])


def test_the_cache_of_framed_columns_starts_again_and_stays_right():
    verifier = ChainVerifier()
    for n in range(MAX_CACHED_CHUNKS + 50):  # each state name is new: the cache fills and is emptied
        row = [str(uuid.UUID(int=n + 1)), 1, "task_run", "transition_decided", str(uuid.uuid4()), None,
               "ACCEPT", "RUNNING", f"Running {n}", str(uuid.uuid4()), "commands", 0, n, None, None, "{}"]
        assert verifier.check(chain([row])[0]) is None
    assert len(verifier._chunks) <= MAX_CACHED_CHUNKS  # noqa: SLF001 - the bound is the point
