"""The trace schema: round trips through CSV and Parquet, column validation, and the Perfetto export."""

import json

import pandas as pd
import pytest

from asyncopd.trace import (COLUMNS, DTYPES, Event, Recorder, from_frame, perfetto_subset, read, to_frame,
                            to_perfetto, write)


def events():
    return [
        Event(t=0.0, kind="admit", version=0, uid=3),
        Event(t=0.0, dur_s=1.25, kind="rollout", worker=1, version=0, uid=3, tokens=17, staleness=0.0),
        Event(t=0.1, dur_s=0.05, kind="decode_iter", worker=1, n_seqs=4, tokens=4),
        Event(t=1.25, kind="drop", uid=4, version=0, staleness=2.0),
        Event(t=1.3, dur_s=0.2, kind="teacher", n_seqs=2, tokens=40),
        Event(t=1.5, dur_s=0.5, kind="learner_step", n_seqs=2, tokens=30, version=1, staleness=0.5),
        Event(t=2.0, dur_s=0.01, kind="weight_sync", worker=1, version=1, bytes=1 << 33),
        Event(t=2.5, dur_s=0.75, kind="rollout", role="teacher", uid=9, tokens=5),   # a teacher-made rollout
    ]


def test_schema_order_and_dtypes():
    df = to_frame(events())
    assert tuple(df.columns) == COLUMNS
    assert df.dtypes.astype(str).to_dict() == {c: str(pd.Series([], dtype=d).dtype) for c, d in DTYPES.items()}
    assert df.role.tolist() == ["scheduler", "rollout", "rollout", "scheduler", "teacher", "learner", "sync", "teacher"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"trace{suffix}"
    write(events(), path)
    df = read(path)
    pd.testing.assert_frame_equal(df, to_frame(events()))
    assert from_frame(df) == events()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]      # no temp file left


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_round_trip(tmp_path, suffix):
    empty = to_frame([])
    assert tuple(empty.columns) == COLUMNS and len(empty) == 0
    write([], tmp_path / f"t{suffix}")
    df = read(tmp_path / f"t{suffix}")
    pd.testing.assert_frame_equal(df, empty)
    assert (df.dtypes == empty.dtypes).all() and from_frame(df) == []


def test_unknown_kind_and_bad_values_raise(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        Event(t=0.0, kind="rollout_end")
    with pytest.raises(ValueError, match="role must be one of"):
        Event(t=0.0, kind="rollout", role="actor")
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        Event(t=0.0, kind="rollout", tokens=-1)
    df = to_frame(events())
    df.loc[2, "kind"] = "bogus"
    with pytest.raises(ValueError, match=r"unknown kind values \['bogus'\]"):
        write(df, tmp_path / "t.csv")


def test_read_rejects_missing_and_extra_columns(tmp_path):
    path = tmp_path / "t.csv"
    to_frame(events()).drop(columns=["staleness"]).assign(gpu=0).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"t.csv.*missing \['staleness'\], extra \['gpu'\]"):
        read(path)
    with pytest.raises(ValueError, match="suffix"):
        write(events(), tmp_path / "t.json")


def test_perfetto_exact(tmp_path):
    evs = [Event(t=0.5, dur_s=1.25, kind="rollout", worker=2, version=3, uid=7, tokens=40),
           Event(t=1.75, kind="drop", uid=7, version=3, staleness=2.0),
           Event(t=2.0, dur_s=0.000001, kind="learner_step", n_seqs=4, tokens=160, version=4, staleness=0.5)]
    to_perfetto(evs, tmp_path / "t.json")
    got = json.loads((tmp_path / "t.json").read_text())
    assert got == {"traceEvents": [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "rollout"}},
        {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "rollout 2"}},
        {"name": "process_name", "ph": "M", "pid": 3, "tid": 0, "args": {"name": "learner"}},
        {"name": "thread_name", "ph": "M", "pid": 3, "tid": 0, "args": {"name": "learner 0"}},
        {"name": "process_name", "ph": "M", "pid": 5, "tid": 0, "args": {"name": "scheduler"}},
        {"name": "thread_name", "ph": "M", "pid": 5, "tid": 0, "args": {"name": "scheduler 0"}},
        {"name": "rollout", "cat": "rollout", "ph": "X", "ts": 500000, "pid": 1, "tid": 2, "dur": 1250000,
         "args": {"version": 3, "uid": 7, "tokens": 40}},
        {"name": "drop", "cat": "scheduler", "ph": "i", "ts": 1750000, "pid": 5, "tid": 0, "s": "t",
         "args": {"version": 3, "uid": 7, "staleness": 2.0}},
        {"name": "learner_step", "cat": "learner", "ph": "X", "ts": 2000000, "pid": 3, "tid": 0, "dur": 1,
         "args": {"version": 4, "n_seqs": 4, "tokens": 160, "staleness": 0.5}},
    ]}


def threads_trace() -> pd.DataFrame:
    """52 events in the simulator's shape: learner 3 and sync 3 (one worker each), 8 rollout replicas × 2, 8
    scheduler threads × 1 admit plus 10 drops on scheduler 0 (11 there), 4 teachers × 3."""
    evs = [Event(t=float(i), dur_s=1.0, kind="learner_step", version=i + 1) for i in range(3)]
    evs += [Event(t=i + 0.5, dur_s=0.1, kind="weight_sync", version=i + 1) for i in range(3)]
    evs += [Event(t=w + i, dur_s=1.0, kind="rollout", worker=w, uid=2 * w + i) for w in range(8) for i in range(2)]
    evs += [Event(t=float(w), kind="admit", worker=w, uid=w) for w in range(8)]
    evs += [Event(t=10.0 + i, kind="drop", uid=20 + i) for i in range(10)]
    evs += [Event(t=w + i, dur_s=0.5, kind="teacher", worker=w, n_seqs=1) for w in range(4) for i in range(3)]
    return to_frame(evs)


# Visiting order (q, role's worker count, size): learner 3, sync 3, teacher 0 3, rollout 0 2, scheduler 0 11,
# [q = 1/8] scheduler 4 1, rollout 4 2, [q = 1/4] teacher 2 3, scheduler 2 1, rollout 2 2, [3/8] scheduler 6, ...
@pytest.mark.parametrize("bound, kept", [
    (30, {"rollout": [0, 4], "teacher": [0, 2], "learner": [0], "sync": [0], "scheduler": [0, 2, 4, 6]}),
    (20, {"rollout": [0, 2, 4], "teacher": [0, 2], "learner": [0], "sync": [0], "scheduler": [2, 4]}),  # 0 too long
])
def test_perfetto_subset_keeps_whole_evenly_spread_threads(bound, kept):
    df = threads_trace()
    out, info = perfetto_subset(df, bound)
    in_kept = pd.Series([w in kept.get(r, []) for r, w in zip(df.role, df.worker)], index=df.index)
    assert out.equals(df[in_kept])                              # exactly the kept threads' rows, whole, in order
    assert info == {"sampled": True, "events_total": 52, "events_written": bound, "kept_workers": kept,
                    "workers_total": {"rollout": 8, "teacher": 4, "learner": 1, "sync": 1, "scheduler": 8},
                    "rule": info["rule"]}
    assert perfetto_subset(df, 52) == (df, {})                  # a trace that fits is not touched


def test_perfetto_bound_writes_the_subset_and_records_it(tmp_path):
    df = threads_trace()
    to_perfetto(df, tmp_path / "cut.json", other={"run": "x"}, max_events=30)
    to_perfetto(perfetto_subset(df, 30)[0], tmp_path / "subset.json")
    cut, subset = (json.loads((tmp_path / f).read_text()) for f in ("cut.json", "subset.json"))
    assert cut["traceEvents"] == subset["traceEvents"]          # name records only for the kept threads
    assert cut["otherData"]["run"] == "x" and cut["otherData"]["events_written"] == 30
    to_perfetto(df, tmp_path / "fits.json", max_events=52)
    to_perfetto(df, tmp_path / "all.json")
    assert (tmp_path / "fits.json").read_text() == (tmp_path / "all.json").read_text()


def test_recorder_uses_callers_clock():
    now = [10.0]
    rec = Recorder(lambda: now[0], origin=10.0)
    rec.instant("admit", version=0, uid=1)
    t0 = rec.now()
    now[0] = 12.5
    rec.span("rollout", t0, uid=1, tokens=8, version=0)
    assert list(rec) == [Event(t=0.0, kind="admit", version=0, uid=1),
                         Event(t=0.0, dur_s=2.5, kind="rollout", uid=1, tokens=8, version=0)]
    assert len(to_frame(rec)) == 2


def edited(path, row: int, col: str, value: str) -> str:
    """The CSV trace at `path` as text, with one cell replaced (read as text, so nothing is reformatted)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[row, col] = value
    return df.to_csv(index=False)


@pytest.mark.parametrize("name, corrupt, message", [
    ("empty.csv", lambda good: b"",
     "empty file; a trace has at least the header row t,dur_s,kind,role,worker,version,uid,n_seqs,tokens,bytes,staleness"),
    ("latin1.csv", lambda good: good.read_text().replace("admit", "admít").encode("latin-1"),
     "not UTF-8 text, so not a CSV trace ('utf-8' codec can't decode byte 0xed in position 3: invalid continuation "
     "byte)"),
    ("ragged.csv", lambda good: good.read_text().replace("\n0.1,", "\n0.1,0,0,", 1).encode(),
     "not a CSV trace: Error tokenizing data. C error: Expected 11 fields in line 4, saw 13"),
    ("tokens.csv", lambda good: edited(good, 2, "tokens", "abc").encode(),
     "column 'tokens' must hold integers; row 2 (line 4) has 'abc'"),
    ("uid.csv", lambda good: edited(good, 1, "uid", "").encode(),
     "column 'uid' must hold integers; row 1 (line 3) has nan"),
    ("n_seqs.csv", lambda good: edited(good, 1, "n_seqs", "1.5").encode(),
     "column 'n_seqs' must hold integers; row 1 (line 3) has 1.5"),
    ("t.csv", lambda good: edited(good, 3, "t", "inf").encode(),
     "column 't' must hold finite numbers; row 3 (line 5) has inf"),
    ("dur_nan.csv", lambda good: edited(good, 3, "dur_s", "nan").encode(),
     "column 'dur_s' must hold finite numbers; row 3 (line 5) has nan"),
    ("dur_neg.csv", lambda good: edited(good, 0, "dur_s", "-0.5").encode(),
     "column 'dur_s' must hold values >= 0; row 0 (line 2) has -0.5"),
    ("kind.csv", lambda good: edited(good, 4, "kind", "rollout_end").encode(),
     "column 'kind' must hold one of admit, rollout, drop, teacher, learner_step, weight_sync, decode_iter; row 4 "
     "(line 6) has 'rollout_end' (unknown kind values ['rollout_end'])"),
    ("parquet_named.csv", lambda good: (good.parent / "good.parquet").read_bytes(), None),   # binary: one message
    ("csv_named.parquet", lambda good: good.read_bytes(), "not a Parquet trace: "),
])
def test_read_refuses_corrupted_files_naming_file_column_and_row(tmp_path, name, corrupt, message):
    good = tmp_path / "good.csv"
    write(events(), good)
    write(events(), tmp_path / "good.parquet")
    path = tmp_path / name
    path.write_bytes(corrupt(good))
    with pytest.raises(ValueError) as e:
        read(path)
    if message is None or message.endswith(": "):      # the reader's own words follow; the head is ours
        assert str(e.value).startswith(f"{path}: not a ")
    else:
        assert str(e.value) == f"{path}: {message}"


def test_read_refuses_nan_in_parquet_and_missing_file(tmp_path):
    df = to_frame(events())
    df.loc[2, "t"] = float("nan")
    df.to_parquet(tmp_path / "t.parquet")                 # written around `write`, which refuses it too
    with pytest.raises(ValueError) as e:
        read(tmp_path / "t.parquet")
    assert str(e.value) == f"{tmp_path / 't.parquet'}: column 't' must hold finite numbers; row 2 has nan"
    with pytest.raises(ValueError) as e:
        read(tmp_path / "none.csv")
    assert str(e.value) == f"{tmp_path / 'none.csv'}: no such file"
    with pytest.raises(ValueError, match="column 'tokens' must hold values >= 0; row 0 has -1"):
        write(to_frame(events()).assign(tokens=-1), tmp_path / "w.csv")
