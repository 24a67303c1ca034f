"""One event schema for the simulator and every backend, so a prediction and a measurement are the same table.

An `Event` is one row with a fixed set of columns (`COLUMNS`, dtypes `DTYPES`): a span (`dur_s > 0`) or an
instant at time `t`. Time comes from the caller (`env.now` in SimPy, `time.monotonic()` in a real run); this
module never reads a clock. Kinds, and the columns each one fills (others keep their defaults):

    admit        scheduler admitted a rollout              version = learner version at admission
    rollout      one trajectory generated (t = start)      uid, tokens, version = behav_version, dur_s
    drop         trajectory dropped as too stale           uid, version = behav_version, staleness
    teacher      one scoring call                          n_seqs, tokens (all positions forwarded), dur_s
    learner_step one optimiser step                        n_seqs, tokens, version = new version, staleness (mean)
    weight_sync  weights published to a worker             bytes, version, dur_s
    decode_iter  one engine iteration (cost calibration)   n_seqs decoded (one token each), tokens = prompt
                                                           tokens prefilled in the iteration, dur_s

`write`/`read` use CSV or Parquet by suffix; `to_perfetto` writes Chrome trace-event JSON for ui.perfetto.dev.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from asyncopd.files import atomic_write

KINDS = ("admit", "rollout", "drop", "teacher", "learner_step", "weight_sync", "decode_iter")
ROLES = ("rollout", "teacher", "learner", "sync", "scheduler")
KIND_ROLES = {"admit": "scheduler", "rollout": "rollout", "drop": "scheduler", "teacher": "teacher",
              "learner_step": "learner", "weight_sync": "sync", "decode_iter": "rollout"}  # default role per kind


@dataclass(frozen=True, kw_only=True)
class Event:
    t: float                   # s, start time (the caller's clock)
    kind: str                  # one of KINDS
    dur_s: float = 0.0         # s, 0 for an instant
    role: str = ""             # one of ROLES; "" = KIND_ROLES[kind]
    worker: int = 0            # worker index within the role
    version: int = -1          # weight version (behaviour version for rollouts, new version for steps); -1 = n/a
    uid: int = -1              # trajectory id; -1 = none
    n_seqs: int = 0            # sequences in the call / step / iteration
    tokens: int = 0            # tokens generated, scored or trained on
    bytes: int = 0             # bytes moved (weight sync)
    staleness: float = 0.0     # versions: a trajectory's, or the mean over a learner batch

    def __post_init__(self):                     # on every event a run writes: the common case is one pass of tests
        if self.kind not in KIND_ROLES:
            raise ValueError(f"Event.kind must be one of {KINDS}, got {self.kind!r}")
        if not self.role:
            object.__setattr__(self, "role", KIND_ROLES[self.kind])
        elif self.role not in ROLES:
            raise ValueError(f"Event.role must be one of {ROLES}, got {self.role!r}")
        if self.dur_s < 0 or self.worker < 0 or self.n_seqs < 0 or self.tokens < 0 or self.bytes < 0:
            name = next(n for n in ("dur_s", "worker", "n_seqs", "tokens", "bytes") if getattr(self, n) < 0)
            raise ValueError(f"Event.{name} must be >= 0, got {getattr(self, name)}")
        if self.version < -1 or self.uid < -1:
            raise ValueError(f"Event.version and Event.uid must be >= -1, got {self.version}, {self.uid}")


COLUMNS = ("t", "dur_s", "kind", "role", "worker", "version", "uid", "n_seqs", "tokens", "bytes", "staleness")
DTYPES = {"t": "float64", "dur_s": "float64", "kind": "str", "role": "str", "worker": "int64", "version": "int64",
          "uid": "int64", "n_seqs": "int64", "tokens": "int64", "bytes": "int64", "staleness": "float64"}
DEFAULTS = {f.name: f.default for f in fields(Event)}  # t and kind have none (dataclasses.MISSING)


def to_frame(events: Iterable[Event]) -> pd.DataFrame:
    """Events as a DataFrame with columns COLUMNS and dtypes DTYPES (also for no events)."""
    events = list(events)
    return pd.DataFrame({c: [getattr(e, c) for e in events] for c in COLUMNS}).astype(DTYPES)


def staleness_hist(counts: dict[int, int]) -> pd.DataFrame:
    """Staleness histogram of trained trajectories ({staleness: count}) as the table sim.run and the toy replay
    write to staleness_hist.csv: columns staleness, count, fraction (sorted by staleness)."""
    df = pd.DataFrame({"staleness": sorted(counts), "count": [int(counts[k]) for k in sorted(counts)]},
                      dtype="int64")
    df["fraction"] = df["count"] / max(1, df["count"].sum())
    return df


INT_COLUMNS = tuple(c for c in COLUMNS if DTYPES[c] == "int64")
FLOAT_COLUMNS = ("t", "dur_s", "staleness")
LOWER_BOUNDS = {"dur_s": 0, "worker": 0, "n_seqs": 0, "tokens": 0, "bytes": 0, "version": -1, "uid": -1}  # as Event


def _validated(df: pd.DataFrame, source: str, line_offset: int | None = None) -> pd.DataFrame:
    """df with exactly the schema's columns, in order and with its dtypes; ValueError naming the source, the
    column and the first bad row (and its line in the file when `line_offset` is given: 2 for a CSV's header)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in COLUMNS]
    if missing or extra:
        raise ValueError(f"{source}: trace columns differ from the schema: missing {missing}, extra {extra}")
    df = df.loc[:, list(COLUMNS)].reset_index(drop=True)

    def bad(col: str, mask: pd.Series, need: str, more: str = "") -> None:
        r = int(mask.to_numpy().argmax())                              # the first bad row
        v = df[col].iloc[r]
        line = f" (line {r + line_offset})" if line_offset is not None else ""
        shown = repr(v) if isinstance(v, str) else v                   # 'abc', nan, -0.5
        raise ValueError(f"{source}: column {col!r} must hold {need}; row {r}{line} has {shown}{more}")

    for col in INT_COLUMNS + FLOAT_COLUMNS:
        x = pd.to_numeric(df[col], errors="coerce").astype("float64")  # non-numeric -> NaN
        if (m := ~np.isfinite(x)).any():
            bad(col, m, "finite numbers" if col in FLOAT_COLUMNS else "integers")
        if col in INT_COLUMNS and (m := x != np.round(x)).any():
            bad(col, m, "integers")
        if col in LOWER_BOUNDS and (m := x < LOWER_BOUNDS[col]).any():
            bad(col, m, f"values >= {LOWER_BOUNDS[col]}")
        df[col] = pd.to_numeric(df[col])                               # e.g. "3.0" read as text, cast below
    for col, allowed in (("kind", KINDS), ("role", ROLES)):
        if (m := ~df[col].isin(allowed)).any():
            unknown = sorted(set(df[col][m].astype(str)))
            bad(col, m, f"one of {', '.join(allowed)}", f" (unknown {col} values {unknown})")
    return df.astype(DTYPES)


def from_frame(df: pd.DataFrame) -> list[Event]:
    """Inverse of `to_frame`: one Event per row, with plain Python scalars."""
    df = _validated(df, "from_frame")
    cols = [df[c].tolist() for c in COLUMNS]
    return [Event(**dict(zip(COLUMNS, row))) for row in zip(*cols)]


def _frame(events_or_frame) -> pd.DataFrame:
    if isinstance(events_or_frame, pd.DataFrame):
        return _validated(events_or_frame, "trace")
    return to_frame(events_or_frame)


def write(events_or_frame, path) -> None:
    """Write a trace as .csv or .parquet (chosen by suffix), atomically."""
    path, df = Path(path), _frame(events_or_frame)
    if path.suffix == ".csv":                    # pyarrow's writer (pandas' own engine): ~5x to_csv at 400k events
        import pyarrow as pa, pyarrow.csv as pa_csv
        table = pa.Table.from_pandas(df, preserve_index=False)
        atomic_write(path, lambda tmp: pa_csv.write_csv(table, tmp, pa_csv.WriteOptions(quoting_style="needed")))
    elif path.suffix == ".parquet":
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    else:
        raise ValueError(f"{path}: trace suffix must be .csv or .parquet, got {path.suffix!r}")


def read(path) -> pd.DataFrame:
    """Read a trace written by `write` (or any producer of the schema). Any problem (no file, empty, not UTF-8,
    not CSV/Parquet, columns, a non-integer, NaN/inf or negative value, an unknown kind or role) is one ValueError
    that starts with the path and names the column and the first bad row (and its line in a CSV)."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"{path}: trace suffix must be .csv or .parquet, got {path.suffix!r}")
    if not path.is_file():
        raise ValueError(f"{path}: " + ("not a file" if path.exists() else "no such file"))
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file; a trace has at least the header row {','.join(COLUMNS)}")
    if path.suffix == ".csv":
        try:
            df = pd.read_csv(path, encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text, so not a CSV trace ({err})") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise ValueError(f"{path}: not a CSV trace: {str(err).strip()}") from None
        return _validated(df, str(path), line_offset=2)            # line 1 is the header
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as err:                           # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a Parquet trace: {err}") from None
    return _validated(df, str(path))


def to_perfetto(events_or_frame, path, other: dict | None = None, max_events: int | None = None) -> None:
    """Write Chrome/Perfetto trace-event JSON: a process per role, a thread per worker, times in µs.

    Spans (dur_s > 0) are "X" complete events, instants are thread-scoped "i" events; `args` holds the
    version/uid/n_seqs/tokens/bytes/staleness columns that differ from their defaults. `other` (JSON-able) becomes
    the file's `otherData`: the run's metadata, shown by the viewer. The events' JSON is built column-wise with
    pandas string operations (kinds and roles are validated tokens, numbers are finite): a cluster-scale simulation
    writes ~400k events, which a per-event Python loop took seconds to encode. With `max_events`, a longer trace
    is cut to whole threads by `perfetto_subset` (the bound counts trace events, not the "M" name records) and
    otherData records what was left out."""
    df = _frame(events_or_frame)
    if max_events is not None and len(df) > max_events:
        df, info = perfetto_subset(df, max_events)
        other = {**(other or {}), **info}
    pid = {role: i + 1 for i, role in enumerate(ROLES)}
    meta = []
    for role in [r for r in ROLES if (df.role == r).any()]:
        meta.append({"name": "process_name", "ph": "M", "pid": pid[role], "tid": 0, "args": {"name": role}})
        for w in sorted(set(df.worker[df.role == role].tolist())):
            meta.append({"name": "thread_name", "ph": "M", "pid": pid[role], "tid": w,
                         "args": {"name": f"{role} {w}"}})
    pieces = [json.dumps(m) for m in meta] + _perfetto_events(df, pid).tolist()
    text = '{"traceEvents": [' + ", ".join(pieces) + "]"
    text += (', "otherData": ' + json.dumps(other, default=str) if other else "") + "}"
    atomic_write(Path(path), text)


def perfetto_subset(df: pd.DataFrame, max_events: int) -> tuple[pd.DataFrame, dict]:
    """At most `max_events` rows of a validated trace frame, as whole threads, and the otherData record of the cut.

    A thread is one Perfetto track: every event of one (role, worker). Threads are kept whole or not at all, so
    the timeline of a kept worker has no holes (a random thinning would leave gaps that read as idle time).
    Threads are visited in the order of q, then of the role's worker count n, then of size (smallest first), and
    each one is kept if it still fits under the bound (so one long thread, such as the scheduler's drops, all on
    worker 0, does not shut out the shorter ones after it):

        q = bit-reversal of r over b bits / 2^b,    r = the worker's rank among its role's n workers, b = ⌈log2 n⌉

    q = 0 is each role's first worker and roles with one worker go first among those, so the learner steps and
    weight syncs are kept whenever the bound covers them. Taking q < f keeps the same fraction f of every role's
    workers, spread evenly over them (r = 0, n/2, n/4, 3n/4, ...: van der Corput order), so a role with 1,024
    rollout replicas and one with 128 teachers are sampled alike. Deterministic; numpy over the events, one
    Python pass over the threads (thousands). A trace that fits comes back unchanged with an empty record."""
    if len(df) <= max_events:
        return df, {}
    M = int(df.worker.max()) + 1
    tid = df.role.map({r: i for i, r in enumerate(ROLES)}).to_numpy() * M + df.worker.to_numpy()
    ids, size = np.unique(tid, return_counts=True)            # threads, sorted by role then worker
    role, worker = ids // M, ids % M
    r = np.arange(len(ids)) - np.searchsorted(role, role)     # rank of the worker within its role
    n = np.bincount(role)[role]
    b = np.ceil(np.log2(n)).astype(np.int64)
    rev = np.zeros_like(r)
    for i in range(int(b.max())):                             # r < 2^b, so bits i >= b are 0
        rev |= ((r >> i) & 1) << np.maximum(b - 1 - i, 0)
    kept, total = [], 0
    for i in np.lexsort((worker, role, size, n, rev / 2.0 ** b)).tolist():   # last key first: q, n, size, ...
        if total + size[i] <= max_events:
            kept.append(i)
            total += int(size[i])
    kept = np.sort(np.array(kept, dtype=np.int64))
    out = df[np.isin(tid, ids[kept])]
    info = {"sampled": True, "events_total": len(df), "events_written": len(out),
            "kept_workers": {ROLES[k]: worker[kept][role[kept] == k].tolist() for k in np.unique(role[kept])},
            "workers_total": {ROLES[k]: int(c) for k, c in enumerate(np.bincount(role)) if c},
            "rule": "whole (role, worker) threads, workers evenly spread per role (asyncopd.trace.perfetto_subset)"}
    return out, info


def _perfetto_events(df: pd.DataFrame, pid: dict[str, int]) -> pd.Series:
    """One JSON object per event, as strings: the rows of `to_perfetto`'s traceEvents after the metadata."""
    def num(values) -> pd.Series:              # JSON numbers: ints as ints, floats as Python's repr
        return pd.Series(values, index=df.index).astype(str)

    span = df.dur_s > 0
    out = ('{"name": "' + df.kind + '", "cat": "' + df.role + '", "ph": "' + np.where(span, "X", "i")
           + '", "ts": ' + num((df.t * 1e6).round(3)) + ', "pid": ' + num(df.role.map(pid))
           + ', "tid": ' + num(df.worker))
    out += np.where(span, ', "dur": ' + num((df.dur_s * 1e6).round(3)), ', "s": "t"')
    args = pd.Series("", index=df.index)
    for c in COLUMNS[5:]:
        args += np.where(df[c] != DEFAULTS[c], ', "' + c + '": ' + num(df[c]), "")
    return out + ', "args": {' + args.str[2:] + "}}"


@dataclass
class Recorder:
    """Collects Events stamped by a caller-supplied clock: `Recorder(time.monotonic)` or `Recorder(lambda: env.now)`.

    Times are clock() − origin; processes of one run share an origin so their traces line up."""

    clock: Callable[[], float]
    origin: float = 0.0
    events: list[Event] = field(default_factory=list)

    def now(self) -> float:
        return self.clock() - self.origin

    def instant(self, kind: str, **cols) -> Event:
        return self.append(Event(t=self.now(), kind=kind, **cols))

    def span(self, kind: str, t0: float, **cols) -> Event:
        """An event from t0 (an earlier `now()`) to now."""
        return self.append(Event(t=t0, dur_s=self.now() - t0, kind=kind, **cols))

    def append(self, event: Event) -> Event:
        self.events.append(event)
        return event

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        return iter(self.events)
