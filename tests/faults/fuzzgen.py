"""A structure-aware generator of hostile command records.

Valid documents are generated from the commands' JSON Schema (the one
`runstate.messages.json_schemas()` writes to schemas/command.schema.json), then
mutated where a hostile or careless producer would: nesting depth, sizes around
the byte limit, numeric extremes, datetimes at the calendar's edges, unicode
the wire or PostgreSQL cannot carry, duplicate keys, field type swaps, record
keys that name another run than the body, tombstones, empty values, headers.

Everything is a function of a seed (`random.Random`), so a failing record is
reproduced from the seed, and a *script* (one run's create and its state
proposals) can be generated again for another run id: its twin, sent one record
per batch, must be decided exactly as the original was (batch boundaries must
not matter).

Ids that a body names come from the fuzzer's own namespace (salted), never from
the workload it is interleaved with, so the workload's reference still holds
whatever the pipeline decides for the fuzz records; the record *keys* may name
workload runs, which puts hostile records right between valid commands.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import UUID

from runstate.messages import json_schemas

NAMESPACE = UUID("7c0f5d44-2b8e-4a51-9f0e-3e6d1c2b9a10")
STATE_TYPES = ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED",
               "CANCELLING"]
# Lifecycle-ish proposals, so that mutated commands reach the rules (retries, caching, scheduling).
LIFECYCLE = ["RUNNING", "RUNNING", "FAILED", "FAILED", "COMPLETED", "PENDING", "SCHEDULED", "CANCELLING",
             "CANCELLED", "CRASHED", "PAUSED"]
TAG_SEPARATOR = chr(31)


class Raw(str):
    """JSON text written verbatim (NaN, 1e400, "\\ud800", thousands of brackets...)."""


class Pairs(list):
    """A JSON object as (key, value) pairs: keys may repeat."""


def to_json(value: Any) -> str:
    """JSON text of `value`; Raw is written as is, Pairs may hold a key twice."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, Raw):
        out.append(value)
    elif isinstance(value, (dict, Pairs)):
        items = value if isinstance(value, Pairs) else list(value.items())
        out.append("{")
        for i, (k, v) in enumerate(items):
            if i:
                out.append(",")
            _write(k, out)
            out.append(":")
            _write(v, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(",")
            _write(v, out)
        out.append("]")
    else:
        out.append(json.dumps(value, ensure_ascii=False))


# --------------------------------------------------------------------------- hostile leaves

def deep(kind: str, n: int) -> Raw:
    """Valid JSON nested `n` levels deep."""
    if kind == "array":
        return Raw("[" * n + "1" + "]" * n)
    if kind == "object":
        return Raw('{"a":' * n + "1" + "}" * n)
    return Raw('[{"a":' * (n // 2) + "null" + "}]" * (n // 2))


def depth_within(shape: str, room: int) -> int:
    """The deepest nesting of `shape` that fits in `room` bytes."""
    per_level = {"array": 2, "object": 6, "mixed": 8}[shape]
    return max(1, room // per_level - 2)


def garbage_brackets(rng: random.Random, n: int) -> bytes:
    """Unbalanced nesting: what a parser must refuse without recursing to death."""
    shape = rng.choice(["[", "{\"a\":", "[{\"k\":", "{\"state\":{\"data\":["])
    tail = rng.choice(["", "1", "]" * rng.randint(0, 10), "}", "\"", "[" * 10])
    return (shape * n + tail).encode()


NUMBERS = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"), Raw("1e-400"),
           Raw("-0.0"), Raw("1e308"), Raw("4.9e-324"), 1e12, -1e12, 10**18, -(10**18), 2**63, 2**64,
           -(2**63) - 1, 0, -1, 0.5, Raw("1" + "0" * 5000), Raw("-" + "9" * 4400), Raw("9" * 20000),
           Raw("1.0e999999999"), Raw("0." + "0" * 3000 + "1")]

# Parse as ISO 8601, but overflow when converted to UTC or when a delay is added.
DATETIMES = ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00+23:59", "0001-01-01T00:00:00Z",
             "0001-01-01T00:00:00-00:01", "9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59.999999-23:59",
             "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59+00:00", "9999-12-31", "0001-01-01",
             "2200-01-01T00:00:00Z", "2000-01-01T00:00:00Z", "2000-02-30T00:00:00Z", "10000-01-01T00:00:00Z",
             "9999-12-31T24:00:00Z", "2000-01-01T00:00:00+24:00", "1e400", "-0001-01-01T00:00:00Z",
             "2000-01-01T00:00:00.9999999999Z", "P1D", ""]

STRINGS = [Raw('"\\ud800"'), Raw('"a\\udfffb"'), Raw('"\\udbff\\udbff"'), Raw('"\\u0000"'), Raw('"x\\u0000y"'),
           Raw('"\\\\u0000"'), "\x01\x02\x1f", "\x7f", "tag" + TAG_SEPARATOR + "tag", TAG_SEPARATOR,
           "\u2028\u2029", "\ufeff", "\U0010ffff", "é" * 300, "", " ", "null", Raw('"\\/"'),
           Raw('"\\uD83D\\uDE00"'), Raw('"\\x41"'), Raw('"\\u12"')]

# Bytes the JSON text cannot hold as UTF-8 (spliced into a string literal).
BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82", b"\xfe\xff"]
# Raw control characters inside a string literal (JSON requires them escaped).
RAW_CONTROL = [b"\x00", b"\x01", b"\x08", b"\x1f", b"\n", b"\t", b"\x1b[31m"]


# --------------------------------------------------------------------------- the schema walker

class SchemaGen:
    """Valid instances of the command schema."""

    def __init__(self, schema: dict | None = None) -> None:
        self.schema = schema or json_schemas()["command"]
        self.defs = self.schema.get("$defs", {})
        mapping = self.schema["discriminator"]["mapping"]
        self.kinds = {kind: self._resolve({"$ref": ref}) for kind, ref in mapping.items()}

    def _resolve(self, s: dict) -> dict:
        while "$ref" in s:
            s = self.defs[s["$ref"].rsplit("/", 1)[1]]
        return s

    def command(self, kind: str, rng: random.Random, fill: Callable[[tuple, dict], Any]) -> dict:
        """A valid `kind` command; `fill(path, schema)` may choose any leaf (ids,
        times...) and returns NotImplemented to let the walker choose."""
        return self.instance(self.kinds[kind], rng, fill, (), optional=0.5)

    def instance(self, s: dict, rng: random.Random, fill, path: tuple, optional: float = 0.3) -> Any:
        chosen = fill(path, s)
        if chosen is not NotImplemented:
            return chosen
        s = self._resolve(s)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return rng.choice(s["enum"])
        if "anyOf" in s or "oneOf" in s:
            options = s.get("anyOf") or s.get("oneOf")
            return self.instance(rng.choice(options), rng, fill, path)
        t = s.get("type")
        if t == "object" or "properties" in s:
            out = {}
            required = set(s.get("required", ()))
            for name, sub in s.get("properties", {}).items():
                if name in required or name == "kind" or rng.random() < optional:
                    value = self.instance(sub, rng, fill, (*path, name))
                    if value is not OMIT:
                        out[name] = value
            return out
        if t == "array":
            return [self.instance(s.get("items", {}), rng, fill, (*path, i)) for i in range(rng.randint(0, 3))]
        if t == "string":
            fmt = s.get("format")
            if fmt == "uuid":
                return str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if fmt == "date-time":
                return rng.choice(["2000-01-01T00:00:00Z", "2200-06-01T12:00:00+02:00", "2001-03-04T05:06:07.123456Z"])
            return rng.choice(["", "x", "fz-" + "".join(rng.choices("abcdefghij-_ é☃", k=rng.randint(1, 12)))])
        if t == "integer":
            lo = s.get("minimum", 0)
            return rng.randint(lo, lo + 3)
        if t == "number":
            lo = s.get("minimum", 0)
            return rng.choice([lo, lo + 0.5, lo + 1])
        if t == "boolean":
            return rng.random() < 0.5
        if t == "null":
            return None
        return rng.choice([None, 1, "x", [1, {"k": "v"}], {"a": [True, None]}])  # untyped (state.data)

    def paths(self, doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
        """Every path to a member of a generated document."""
        if isinstance(doc, Pairs):
            return
        if isinstance(doc, dict):
            for k, v in doc.items():
                yield (*prefix, k)
                yield from self.paths(v, (*prefix, k))
        elif isinstance(doc, list):
            for i, v in enumerate(doc):
                yield (*prefix, i)
                yield from self.paths(v, (*prefix, i))


OMIT = object()


# --------------------------------------------------------------------------- records

@dataclass
class FuzzRecord:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    category: str  # "valid" or the mutations applied, "+"-joined
    command_id: UUID | None = None  # the body's unique command id, when the body still carries it intact
    run_id: UUID | None = None  # the run the body names (fuzz namespace)
    script: int | None = None  # index of the script it belongs to
    step: int = 0


@dataclass
class Script:
    index: int
    seed: int
    run_id: UUID
    records: list[FuzzRecord] = field(default_factory=list)
    twin_of: int | None = None  # a twin: the same script for another run, sent one record per batch


class Ids:
    """Ids of the fuzzer's own namespace: deterministic per (salt, script, counter)."""

    def __init__(self, salt: str, script_seed: int) -> None:
        self.space = uuid.uuid5(NAMESPACE, f"{salt}:{script_seed}")
        self.n = 0

    def new(self, what: str = "id") -> UUID:
        self.n += 1
        return uuid.uuid5(self.space, f"{what}:{self.n}")


class Mutator:
    """Applies hostile changes to generated documents and records."""

    BODY_MUTATIONS: ClassVar[list[str]] = ["depth_data", "size", "number", "datetime", "unicode", "bad_utf8", "raw_control",
                      "dup_key", "type_swap", "drop_field", "extra_field", "kind_swap", "truncate",
                      "scheduled_overflow", "retry_arith", "nul", "tag_separator", "wrong_root"]
    KEY_MUTATIONS: ClassVar[list[str]] = ["key_other_run", "key_workload_run", "key_none", "key_empty", "key_garbage", "key_upper",
                     "key_braced", "key_separator", "key_huge"]

    def __init__(self, gen: SchemaGen, max_bytes: int) -> None:
        self.gen = gen
        self.max_bytes = max_bytes

    # -- body ----------------------------------------------------------------
    def mutate_body(self, doc: dict, rng: random.Random, what: str) -> tuple[Any, bytes | None]:
        """(document, None) or (None, raw bytes) for mutations below the JSON level."""
        if not isinstance(doc, dict):  # an earlier mutation replaced the object itself
            return doc, None
        paths = list(self.gen.paths(doc))
        if what == "depth_data":
            shape = rng.choice(["array", "object", "mixed"])
            n = rng.choice([100, 1000, 2000, 5000, 10000, 30000])
            _set(doc, ("state", "data"), deep(shape, min(n, depth_within(shape, self.max_bytes - 600))))
        elif what == "size":
            delta = rng.choice([-2, -1, 0, 1, 2, 100, -100])  # bytes beyond the limit
            target = ("state", "message") if "state" in doc else ("name",)
            _set(doc, target, "")
            _set(doc, target, "m" * max(0, self.max_bytes + delta - len(to_json(doc).encode())))
        elif what == "number":
            where = rng.choice([("state", "data"), ("empirical_policy", "retries"), ("empirical_policy", "retry_delay"),
                                ("empirical_policy", "retry_jitter_factor"), ("empirical_policy", "max_retries"),
                                ("empirical_policy", "retry_delay_seconds"), ("state", "data", "x"),
                                ("empirical_policy", "retry_delay", 0), ("force",), ("state", "type")])
            _set(doc, where, rng.choice(NUMBERS))
        elif what == "retry_arith":
            policy = {"retries": rng.choice([1, 3, 10**9, 2**31, 2**63 - 1, 10**18]),
                      "retry_delay": rng.choice([1e12, 1e15, 1e300, 10**12, [1e12, 1e12], [0, 1e300], 2**62]),
                      "retry_jitter_factor": rng.choice([None, 0, 1e12, 1e300, 2**62, Raw("1e308")])}
            _set(doc, ("empirical_policy",), policy)
        elif what in ("datetime", "scheduled_overflow"):
            where = (("state", "state_details", "scheduled_time") if what == "scheduled_overflow" else
                     rng.choice([("state", "state_details", "scheduled_time"), ("state", "state_details", "cache_expiration"),
                                 ("state", "state_details", "pause_timeout"), ("cache_expiration",)]))
            if what == "scheduled_overflow" and "state" in doc:
                _set(doc, ("state", "type"), rng.choice(["SCHEDULED", "SCHEDULED", "PAUSED", "PENDING"]))
            _set(doc, where, rng.choice(DATETIMES))
        elif what in ("unicode", "tag_separator", "nul"):
            options = {"unicode": STRINGS, "tag_separator": ["a" + TAG_SEPARATOR + "b", TAG_SEPARATOR, "fz" + TAG_SEPARATOR],
                       "nul": [Raw('"\\u0000"'), Raw('"fz\\u0000"'), Raw('"\\\\u0000"')]}[what]
            if what == "tag_separator":
                tags = doc.get("tags")
                _set(doc, ("tags", len(tags) if isinstance(tags, list) else 0), rng.choice(options))
            else:
                strings = [p for p in paths if isinstance(_get(doc, p), str) and p[-1] not in ("kind",)]
                strings += [("state", "message"), ("name",), ("state", "data"), ("tags", 0),
                            ("state", "state_details", "cache_key")]
                _set(doc, rng.choice(strings), rng.choice(options))
        elif what in ("bad_utf8", "raw_control"):
            text = to_json(doc).encode()
            quotes = [i for i, c in enumerate(text) if c == ord('"')]
            at = rng.choice(quotes) + 1 if quotes else len(text)
            junk = rng.choice(BAD_UTF8 if what == "bad_utf8" else RAW_CONTROL)
            return None, text[:at] + junk + text[at:]
        elif what == "dup_key":
            target = doc
            if isinstance(doc.get("state"), dict) and rng.random() < 0.5:
                target = doc["state"]
            if not target:
                return doc, None
            name = rng.choice(list(target))
            other = self.gen.instance({}, rng, lambda p, s: NotImplemented, ())
            pairs = Pairs(target.items())
            pairs.insert(rng.randrange(len(pairs) + 1), (name, rng.choice([other, target[name], None, Raw("NaN")])))
            if target is doc:
                return pairs, None
            doc["state"] = pairs
        elif what == "type_swap":
            if paths:
                _set(doc, rng.choice(paths), rng.choice([1, -1, 1.5, True, None, "s", [], {}, [None], {"k": 1},
                                                         Raw("NaN"), "00000000-0000-0000-0000-00000000000g"]))
        elif what == "drop_field":
            if paths:
                p = rng.choice(paths)
                parent = _get(doc, p[:-1]) if len(p) > 1 else doc
                if isinstance(parent, dict):
                    parent.pop(p[-1], None)
                elif isinstance(parent, list) and parent:
                    parent.pop(p[-1] if isinstance(p[-1], int) and p[-1] < len(parent) else 0)
        elif what == "extra_field":
            target = doc if rng.random() < 0.5 or not isinstance(doc.get("state"), dict) else doc["state"]
            target[rng.choice(["id", "timestamp", "x", "", "kind ", "Kind", TAG_SEPARATOR, "__proto__",
                               "state_details", "command_id "])] = rng.choice([1, "x", None, {"a": 1}])
        elif what == "kind_swap":
            doc["kind"] = rng.choice(["create_task_run", "set_task_run_state", "create_flow_run",
                                      "set_flow_run_state", "", "SET_TASK_RUN_STATE", "x", None, 1])
        elif what == "truncate":
            text = to_json(doc).encode()
            return None, text[: rng.randrange(max(1, len(text)))]
        elif what == "wrong_root":
            return rng.choice([[doc], "s", 1, None, Raw("NaN"), [], Raw("1e400")]), None
        return doc, None

    # -- key -----------------------------------------------------------------
    def mutate_key(self, key: bytes | None, rng: random.Random, what: str, other_keys: list[bytes],
                   workload_keys: list[bytes]) -> bytes | None:
        if what == "key_other_run":
            return rng.choice(other_keys) if other_keys else key
        if what == "key_workload_run":
            return rng.choice(workload_keys) if workload_keys else key
        if what == "key_none":
            return None
        if what == "key_empty":
            return b""
        if what == "key_garbage":
            return rng.randbytes(rng.randint(1, 40))
        if what == "key_upper":
            return key.upper() if key else key
        if what == "key_braced":
            return b"{" + key + b"}" if key else key
        if what == "key_separator":
            return (key or b"") + TAG_SEPARATOR.encode()
        return b"k" * rng.choice([1000, 10_000])  # the topic takes commands + 64 KiB: a larger record never lands

    # -- headers -----------------------------------------------------------------
    @staticmethod
    def headers(rng: random.Random) -> list[tuple[str, bytes]]:
        names = ["x-error-code", "x-source-offset", "x-source-partition", "traceparent", "", "content-type",
                 "\u2603", "h" * 300, "kind", TAG_SEPARATOR]
        values = [b"", b"orchestration_failed", b"-1", b"\xff\xfe", b"\x00", b"9" * 50, b"x" * 5000,
                  b"application/json", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
        return [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(1, 4))]


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        try:
            doc = doc[p]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def _set(doc: Any, path: tuple, value: Any) -> None:
    """Set doc[path] = value, creating objects on the way; a path through a
    non-container replaces that member by an object."""
    target = doc
    for i, p in enumerate(path[:-1]):
        nxt = target[p] if _has(target, p) else None
        if (not isinstance(nxt, (dict, list)) or isinstance(nxt, Pairs)
                or (isinstance(nxt, list) and not isinstance(path[i + 1], int))):
            nxt = [] if isinstance(path[i + 1], int) else {}
            _put(target, p, nxt)
        target = nxt
    _put(target, path[-1], value)


def _has(target: Any, p: Any) -> bool:
    if isinstance(target, dict):
        return p in target
    return isinstance(target, list) and isinstance(p, int) and p < len(target)


def _put(target: Any, p: Any, value: Any) -> None:
    if isinstance(target, dict):
        target[p] = value
    elif isinstance(target, list):
        if isinstance(p, int) and p < len(target):
            target[p] = value
        else:
            target.append(value)


# --------------------------------------------------------------------------- the plan

class FuzzPlan:
    """`scripts` (a run's create and proposals, each record mutated or not) and
    `loose` records (garbage, tombstones, other messages) for `n` records in all."""

    def __init__(self, seed: int, n: int, *, max_bytes: int, workload_keys: list[bytes], salt: str | None = None,
                 mutation_rate: float = 0.45, twins: int = 0, schema: dict | None = None) -> None:
        self.seed = seed
        self.salt = salt or uuid.uuid4().hex[:12]
        self.max_bytes = max_bytes
        self.workload_keys = workload_keys
        self.mutation_rate = mutation_rate
        self.gen = SchemaGen(schema)
        self.mut = Mutator(self.gen, max_bytes)
        rng = random.Random(seed)
        self.scripts: list[Script] = []
        self.loose: list[FuzzRecord] = []
        self.twins: list[Script] = []
        count = 0
        while count < n:
            if rng.random() < 0.2:
                rec = self.loose_record(random.Random(rng.getrandbits(64)))
                self.loose.append(rec)
                count += 1
            else:
                script = self.script(len(self.scripts), rng.getrandbits(64))
                self.scripts.append(script)
                count += len(script.records)
        # Twins of scripts whose keys all name their own run (a mismatched key
        # moves records to another partition, where order is not kept).
        candidates = [s for s in self.scripts if all(r.key == str(s.run_id).encode() for r in s.records)]
        for s in rng.sample(candidates, min(twins, len(candidates))):
            twin = self.script(len(self.scripts) + len(self.twins), s.seed, twin_salt="twin")
            twin.twin_of = s.index
            self.twins.append(twin)

    def exclude(self, mutations: set[str]) -> None:
        """Leave out the records of these mutations (and the twins of scripts that lose one)."""
        def keep(rec: FuzzRecord) -> bool:
            return not mutations & set(rec.category.removeprefix("loose:").split("+"))

        for s in self.scripts:
            s.records = [r for r in s.records if keep(r)]
        self.loose = [r for r in self.loose if keep(r)]
        self.twins = [t for t in self.twins if all(keep(r) for r in t.records)
                      and len(self.scripts[t.twin_of].records) == len(t.records)]

    @property
    def records(self) -> list[FuzzRecord]:
        return [r for s in self.scripts for r in s.records] + self.loose

    def script(self, index: int, seed: int, twin_salt: str = "") -> Script:
        rng = random.Random(seed)
        ids = Ids(self.salt + twin_salt, seed)
        run_id = ids.new("run")
        flow_id = ids.new("flow")  # never created: a dangling flow_run_id
        script = Script(index, seed, run_id)
        own_key = str(run_id).encode()
        other_keys = [str(ids.new("other")).encode()]
        steps = ["create_task_run"] + [rng.choice(LIFECYCLE) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.05:
            steps = ["create_flow_run", "set_flow_run_state", "set_flow_run_state"]
        for step, what in enumerate(steps):
            kind = what if what in ("create_task_run", "create_flow_run", "set_flow_run_state") else "set_task_run_state"
            command_id = ids.new("cmd")
            transition_id = ids.new("tid")
            cache_key = f"fz-{ids.new('cache')}"

            def fill(path: tuple, s: dict, kind=kind, what=what, command_id=command_id,
                     transition_id=transition_id, cache_key=cache_key) -> Any:
                name = path[-1] if path else None
                if path == ("command_id",):
                    return str(command_id)
                if path in (("id",), ("task_run_id",), ("flow_run_id",)) and kind != "create_task_run":
                    return str(run_id)
                if path == ("id",):
                    return str(run_id)
                if path == ("flow_run_id",):
                    return rng.choice([None, str(flow_id)])
                if path == ("state",) and kind == "create_task_run" and rng.random() < 0.6:
                    return OMIT  # the default initial state (PENDING)
                if path == ("state", "type") and kind == "set_task_run_state":
                    return what
                if name == "transition_id":
                    return str(transition_id)
                if name in ("cache_key",):
                    return rng.choice([None, cache_key])
                if name in ("task_run_id", "flow_run_id", "child_flow_run_id") and len(path) > 1:
                    return None
                if name == "deployment_concurrency_lease_id":
                    return None
                if path == ("empirical_policy",):
                    return {"retries": rng.choice([0, 1, 2, 3]), "retry_delay": 0}
                if path == ("tags",):
                    return [f"fz-{rng.randint(0, 5)}"] if rng.random() < 0.3 else []
                if name == "data":
                    return rng.choice([None, 1, "x", {"k": [1, 2]}, [True, None]])
                if name == "force":
                    return False
                if name in ("pause_timeout", "scheduled_time", "cache_expiration"):
                    return rng.choice([None, "2000-01-01T00:00:00Z", "2200-06-01T12:00:00+02:00"])
                if name == "run_input_keyset":
                    return None
                return NotImplemented

            doc = self.gen.command(kind, rng, fill)
            if rng.random() < 0.92:  # mostly present, so an answer can be matched to its record
                doc["command_id"] = str(command_id)
            category = "valid"
            raw = None
            rate = self.mutation_rate * (0.5 if step == 0 else 1.0)
            if rng.random() < rate:
                muts = rng.sample(Mutator.BODY_MUTATIONS, rng.choice([1, 1, 1, 2]))
                for m in muts:
                    if raw is None:
                        doc, raw = self.mut.mutate_body(doc, rng, m)
                category = "+".join(muts)
            key = own_key
            if rng.random() < 0.12:
                km = rng.choice(Mutator.KEY_MUTATIONS)
                key = self.mut.mutate_key(key, rng, km, other_keys, self.workload_keys)
                category += "+" + km
            headers = Mutator.headers(rng) if rng.random() < 0.1 else []
            if headers:
                category += "+headers"
            value = raw if raw is not None else to_json(doc).encode("utf-8", "surrogatepass")
            intact = raw is None and isinstance(doc, dict) and doc.get("command_id") == str(command_id)
            script.records.append(FuzzRecord(key, value, headers, category, command_id if intact else None,
                                             run_id, index, step))
        return script

    def loose_record(self, rng: random.Random) -> FuzzRecord:
        ids = Ids(self.salt + "loose", rng.getrandbits(64))
        kind = rng.choice(["garbage_brackets", "deep_valid", "tombstone", "empty", "binary", "whitespace",
                           "json_scalar", "other_message", "oversize", "just_under", "unknown_run", "bom",
                           "utf16", "huge_int_doc", "deep_garbage_small"])
        key: bytes | None = rng.choice([str(ids.new()).encode(), None, b"", *self.workload_keys[:50]])
        value: bytes | None
        command_id = None
        if kind == "garbage_brackets":
            value = garbage_brackets(rng, rng.choice([1000, 5000, 20000, self.max_bytes // 6]))[: self.max_bytes]
        elif kind == "deep_garbage_small":
            value = garbage_brackets(rng, rng.randint(1, 60))
        elif kind == "deep_valid":
            shape = rng.choice(["array", "object", "mixed"])
            n = min(rng.choice([1000, 3000, 10000, 100000]), depth_within(shape, self.max_bytes - 300))
            command_id = ids.new("cmd")
            doc = {"kind": "set_task_run_state", "command_id": str(command_id), "task_run_id": str(ids.new("run")),
                   "state": {"type": "COMPLETED", "data": deep(shape, n)}}
            value = to_json(doc).encode()
        elif kind == "tombstone":
            value = None
            if key is None:  # a producer cannot send a record with neither
                key = rng.choice([b"", str(ids.new()).encode()])
        elif kind == "empty":
            value = b""
        elif kind == "binary":
            value = rng.randbytes(rng.randint(1, 300))
        elif kind == "whitespace":
            value = rng.choice([b" ", b"\n\t\r ", b"\x00", b"\x00" * 100])
        elif kind == "json_scalar":
            value = rng.choice([b"null", b"true", b"0", b'"x"', b"[]", b"{}", b"NaN", b"1e400", b"-Infinity"])
        elif kind == "other_message":
            value = to_json({"command_id": str(ids.new()), "command_kind": "set_task_run_state", "stream_id": str(ids.new()),
                             "seq": 1, "status": "ACCEPT", "state_appended": True}).encode()
        elif kind in ("oversize", "just_under"):
            command_id = ids.new("cmd")
            doc = {"kind": "set_task_run_state", "command_id": str(command_id), "task_run_id": str(ids.new("run")),
                   "state": {"type": "RUNNING", "message": ""}}
            room = self.max_bytes - len(to_json(doc))
            doc["state"]["message"] = "m" * (room + (rng.randint(1, 64) if kind == "oversize" else -rng.randint(0, 8)))
            value = to_json(doc).encode()
        elif kind == "unknown_run":
            command_id = ids.new("cmd")
            value = to_json({"kind": "set_task_run_state", "command_id": str(command_id),
                             "task_run_id": str(ids.new("run")), "state": {"type": "RUNNING"}}).encode()
        elif kind == "bom":
            command_id = ids.new("cmd")
            value = b"\xef\xbb\xbf" + to_json({"kind": "create_task_run", "command_id": str(command_id),
                                               "id": str(ids.new("run"))}).encode()
        elif kind == "utf16":
            value = to_json({"kind": "create_task_run", "id": str(ids.new("run"))}).encode("utf-16")
        else:  # huge_int_doc
            value = ('{{"kind":"create_task_run","id":"{}","empirical_policy":{{"retries":{}}}}}'.format(ids.new("run"), "9" * rng.choice([100, 4300, 5000, 50000]))).encode()[: self.max_bytes + 10]
        headers = Mutator.headers(rng) if rng.random() < 0.2 else []
        return FuzzRecord(key, value, headers, "loose:" + kind + ("+headers" if headers else ""), command_id)
