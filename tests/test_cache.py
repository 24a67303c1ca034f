"""TeacherScores: bytes arithmetic, validation, the safetensors file format (round trip and malformed files), and
what a teacher needs from a trajectory (check_scorable)."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from asyncopd.cache import (TeacherScores, bytes_per_token, check_scorable, full_logits_bytes_per_token, layout_table,
                            load_scores, save_scores)
from asyncopd.rollout import Trajectory


def make(L, k=0, M=0, sampler=False, version=0, seed=0):
    """Valid scores: top-k log-probs from a real 50-token distribution, so the tail mass is consistent."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(L, 50, generator=g).log_softmax(-1)
    fields = {"sampled_logp": logp[:, 0].clone()}
    if k:
        topk_logp, topk_ids = logp.topk(k, dim=-1)
        fields |= {"topk_ids": topk_ids, "topk_logp": topk_logp, "tail_mass": 1 - topk_logp.exp().sum(-1)}
    if M:
        ids = torch.randint(0, 50, (L, M), generator=g)
        fields |= {"sample_ids": ids, "sample_logp": logp.gather(1, ids)}
        if sampler:
            fields["sampler_logp"] = -torch.rand(L, M, generator=g)
    return TeacherScores(**fields, teacher_version=version)


def test_bytes_per_token_exact():
    assert bytes_per_token() == 4                                  # sampled-token logp only
    assert bytes_per_token(k=1) == 16                              # 8k + 8
    assert bytes_per_token(k=64) == 520
    assert bytes_per_token(n_samples=4) == 4 + 48                  # samples add 12M
    assert bytes_per_token(n_samples=4, sampler_logp=False) == 4 + 32
    assert bytes_per_token(k=64, n_samples=4) == 520 + 48
    assert full_logits_bytes_per_token(151936) == 303872
    with pytest.raises(ValueError, match="exceeds vocab_size"):
        bytes_per_token(k=10, vocab_size=8)


def test_layout_table_values():
    df = layout_table(151936, ks=(0, 64), ms=(0, 4))
    assert df.layout.tolist() == ["sampled", "mc-4", "top-64", "top-64 + mc-4", "full bf16"]
    assert df.bytes_per_token.tolist() == [4, 52, 520, 568, 303872]
    assert df.ratio_to_full.iloc[2] == pytest.approx(520 / 303872)
    assert df.k.isna().tolist() == [False] * 4 + [True]


def test_nbytes_equals_layout_and_bytes_on_disk(tmp_path):
    scores = [make(5, k=3, M=2, sampler=True), make(7, k=3, M=2, sampler=True, seed=1)]
    assert scores[0].nbytes() == bytes_per_token(k=3, n_samples=2) * 5 == (8 * 3 + 8 + 12 * 2) * 5
    path = tmp_path / "c.safetensors"
    save_scores(scores, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = {name: e["data_offsets"][1] - e["data_offsets"][0] for name, e in header.items() if name != "__metadata__"}
    assert sum(v for name, v in data.items() if name != "offsets") == sum(s.nbytes() for s in scores) == 56 * 12
    assert data["offsets"] == 8 * 3
    assert len(raw) == 8 + n + sum(data.values())                 # nothing else in the file


def test_round_trip_bit_exact(tmp_path):
    scores = [make(L, k=4, M=3, sampler=True, version=v, seed=L) for L, v in ((5, 0), (1, 2), (0, 2), (9, 7))]
    scores[0].topk_ids[0, 0] = 2**31 - 1                          # the largest id int32 holds
    save_scores(scores, tmp_path / "c.safetensors")
    back = load_scores(tmp_path / "c.safetensors")
    assert len(back) == 4
    for a, b in zip(scores, back):
        assert (b.n_tokens, b.k, b.M, b.teacher_version) == (a.n_tokens, 4, 3, a.teacher_version)
        for name in ("sampled_logp", "topk_ids", "topk_logp", "tail_mass", "sample_ids", "sample_logp", "sampler_logp"):
            x, y = getattr(a, name), getattr(b, name)
            assert y.dtype == x.dtype and torch.equal(x, y), name


def test_round_trip_minimal_and_empty(tmp_path):
    save_scores([make(3), make(2, seed=1)], tmp_path / "a.safetensors")
    back = load_scores(tmp_path / "a.safetensors")
    assert [s.n_tokens for s in back] == [3, 2] and back[0].topk_ids is None and back[0].sample_ids is None
    save_scores([], tmp_path / "b.safetensors")
    assert load_scores(tmp_path / "b.safetensors") == []


def test_tail_mass_derived_when_omitted():
    s = make(4, k=2)
    t = TeacherScores(s.sampled_logp, s.topk_ids, s.topk_logp)
    assert torch.allclose(t.tail_mass, s.tail_mass)


def test_truncated_file_raises(tmp_path):
    path = tmp_path / "c.safetensors"
    save_scores([make(6, k=2)], path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{path.name}.*not a readable safetensors"):
        load_scores(path)


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_scores(path)


def test_foreign_or_inconsistent_file_raises(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"x": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not an asyncopd teacher-score cache"):
        load_scores(path)
    meta = {"format": "asyncopd.teacher_scores", "format_version": "1", "k": "2", "n_samples": "0",
            "sampler_logp": "false", "n_trajectories": "1", "teacher_versions": "[0]"}
    save_file({"offsets": torch.tensor([0, 3]), "sampled_logp": torch.zeros(3)}, path, metadata=meta)
    with pytest.raises(ValueError, match=r"missing tensors \['tail_mass', 'topk_ids', 'topk_logp'\]"):
        load_scores(path)
    save_file({"offsets": torch.tensor([0, 4]), "sampled_logp": torch.zeros(3)}, path, metadata=meta | {"k": "0"})
    with pytest.raises(ValueError, match=r"sampled_logp must be torch.float32 \[4\], got torch.float32 \[3\]"):
        load_scores(path)
    save_file({"offsets": torch.tensor([0, 3]), "sampled_logp": torch.zeros(3)}, path,
              metadata=meta | {"k": "0", "n_trajectories": "2"})
    with pytest.raises(ValueError, match="1 teacher_versions for 2 trajectories"):
        load_scores(path)


def test_mismatched_shapes_raise():
    s = make(4, k=2, M=3)
    msg = r"topk_logp must be torch.float32 \[L, k\] = \[4, 2\], got torch.float32 \[3, 2\]"
    with pytest.raises(ValueError, match=msg):
        TeacherScores(s.sampled_logp, s.topk_ids, s.topk_logp[:3])
    with pytest.raises(ValueError, match="sample_ids and sample_logp must be given together"):
        TeacherScores(s.sampled_logp, sample_ids=s.sample_ids)
    with pytest.raises(ValueError, match=r"sample_ids must be torch.int64"):
        TeacherScores(s.sampled_logp, sample_ids=s.sample_ids.int(), sample_logp=s.sample_logp)
    with pytest.raises(ValueError, match=r"sampled_logp must be torch.float32"):
        TeacherScores(s.sampled_logp.double())


def test_tail_mass_inconsistent_raises():
    s = make(4, k=2)
    with pytest.raises(ValueError, match="tail_mass is inconsistent"):
        TeacherScores(s.sampled_logp, s.topk_ids, s.topk_logp, s.tail_mass + 0.01)
    renormalised = s.topk_logp.log_softmax(-1)                    # sums to 1 over k: not full-vocabulary
    with pytest.raises(ValueError, match="tail_mass is inconsistent"):
        TeacherScores(s.sampled_logp, s.topk_ids, renormalised, s.tail_mass)


def test_ids_outside_int32_raise_on_save(tmp_path):
    s = make(3, k=2)
    s.topk_ids[1, 0] = 2**31
    with pytest.raises(ValueError, match="topk_ids holds ids outside int32"):
        save_scores([s], tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []                         # no file, no temp file left behind


def test_save_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "c.safetensors"
    save_scores([make(2)], path)
    save_scores([make(5), make(1)], path)
    assert [s.n_tokens for s in load_scores(path)] == [5, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_mixed_layouts_raise(tmp_path):
    with pytest.raises(ValueError, match="share one layout"):
        save_scores([make(2, k=2), make(2, k=3)], tmp_path / "c.safetensors")


def test_check_scorable_needs_ids_and_enough_captured_samples():
    L, M = 3, 2
    traj = Trajectory(uid=7, behav_version=0, n_tokens=L, prompt_ids=torch.tensor([1, 2]),
                      response_ids=torch.tensor([3, 4, 5]), sample_ids=torch.zeros(L, M, dtype=torch.long),
                      sample_behav_logp=torch.zeros(L, M))
    check_scorable([traj], 0, n_samples=M)                     # ids and M captured samples: scorable
    check_scorable([Trajectory(uid=8, behav_version=0, n_tokens=1, prompt_ids=torch.tensor([1]),
                               response_ids=torch.tensor([2]))], 4, n_samples=0, max_topk=4)
    with pytest.raises(ValueError, match="trajectory 7 carries 2 captured samples per token, n_samples=3"):
        check_scorable([traj], 0, n_samples=M + 1)
    with pytest.raises(ValueError, match="trajectory 0 has no token ids"):
        check_scorable([Trajectory.fake(0, 3, 0)], 0, n_samples=0)
    with pytest.raises(ValueError, match=r"topk must be in \[0, 4\], got 5"):
        check_scorable([traj], 5, n_samples=0, max_topk=4)
    with pytest.raises(ValueError, match=r"n_samples must be in \[0, 2\], got 3"):
        check_scorable([traj], 0, n_samples=3, max_samples=2)
