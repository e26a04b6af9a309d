"""The reader (pipeline/data.py) on a real prepared dataset: rank splitting, global order
independent of dp_size, exact mid-epoch resume without re-reading, reshuffled epochs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.common.errors import RdptDataError
from pipeline.data.loader import ResumableLoader, SplitReader, iterate_sequences, open_dataset
from tests.distributed import run_distributed


def step_ids(loader: ResumableLoader, steps: int) -> list[list[int]]:
    """The sample ids of the next `steps` steps (one flat list per step)."""
    out = []
    for batches in itertools.islice(iter(loader), steps):
        out.append(torch.cat([mb.sample_ids for mb in batches]).tolist())
    return out


def _rank_epoch(rank: int, world: int, path: str) -> dict:
    """Runs in each of 2 real processes: one epoch of this rank's samples (+ their rows)."""
    loader = ResumableLoader(
        path, split="train", micro_batch_size=3, grad_accum=2, dp_rank=rank, dp_size=world, seed=7
    )
    ids, rows = [], []
    for batches in itertools.islice(iter(loader), loader.steps_per_epoch):
        for mb in batches:
            assert mb.inputs.dtype == torch.long and mb.inputs.shape == mb.targets.shape
            assert torch.equal(mb.inputs[:, 1:], mb.targets[:, :-1])
            ids += mb.sample_ids.tolist()
            rows.append(torch.cat([mb.inputs, mb.targets[:, -1:]], dim=1).numpy())
    return {"ids": ids, "rows": np.concatenate(rows), "epoch_after": loader.epoch}


def test_two_ranks_read_disjoint_parts_that_together_are_everything(tiny_dataset):
    results = run_distributed(_rank_epoch, 2, args=(str(tiny_dataset),), timeout=300)
    a, b = results[0]["ids"], results[1]["ids"]
    info = open_dataset(tiny_dataset)
    n = info.num_sequences("train")
    global_batch = 3 * 2 * 2
    assert not set(a) & set(b)
    assert len(set(a) | set(b)) == len(a) + len(b) == n // global_batch * global_batch
    assert len(a) == len(b)
    # every sample is the stored sequence with that id
    reader = SplitReader(info, "train")
    for res in results:
        assert np.array_equal(res["rows"], reader.sequences(np.asarray(res["ids"])))


def test_global_order_does_not_depend_on_dp_size(tiny_dataset):
    one = ResumableLoader(tiny_dataset, micro_batch_size=4, grad_accum=2, seed=3, prefetch=0)
    two = [
        ResumableLoader(
            tiny_dataset, micro_batch_size=2, grad_accum=2, dp_rank=r, dp_size=2, seed=3
        )
        for r in range(2)
    ]
    ref = step_ids(one, 40)
    parts = [step_ids(loader, 40) for loader in two]
    assert [p0 + p1 for p0, p1 in zip(*parts)] == ref
    other_seed = ResumableLoader(tiny_dataset, micro_batch_size=8, seed=4, prefetch=0)
    assert step_ids(other_seed, 40) != ref


def test_resume_continues_with_the_next_unseen_samples_without_rereading(tiny_dataset):
    kw = dict(micro_batch_size=5, grad_accum=3, seed=11)
    ref = step_ids(ResumableLoader(tiny_dataset, **kw), 60)
    for prefetch in (0, 3):
        loader = ResumableLoader(tiny_dataset, prefetch=prefetch, **kw)
        first = step_ids(loader, 25)
        state = loader.state_dict()
        assert first == ref[:25] and state["steps"] == 25 and state["position"] == 25 * 15
        resumed = ResumableLoader(tiny_dataset, prefetch=0, **kw)
        resumed.load_state_dict(state)
        assert step_ids(resumed, 35) == ref[25:]
        # only the members that hold the samples handed out after the resume were decoded
        reader = resumed.reader
        needed = {
            int(np.searchsorted(reader.member_first, i, side="right") - 1)
            for step in ref[25:]
            for i in step
        }
        assert set(reader.members_read) == needed
        assert len(reader.members_read) == len(needed)
    with pytest.raises(RdptDataError, match="seed"):
        ResumableLoader(tiny_dataset, micro_batch_size=5, grad_accum=3, seed=12).load_state_dict(
            state
        )


def test_epochs_are_reshuffled_permutations_and_resume_across_the_boundary(tiny_dataset):
    loader = ResumableLoader(tiny_dataset, micro_batch_size=16, seed=5)
    per_epoch = loader.steps_per_epoch
    n_used = per_epoch * 16
    ids = [i for step in step_ids(loader, 2 * per_epoch + 3) for i in step]
    e0, e1 = ids[:n_used], ids[n_used : 2 * n_used]
    assert len(set(e0)) == len(set(e1)) == n_used  # each epoch: no sample twice
    assert e0 != e1 and loader.epoch == 2
    # within an epoch the order reads members whole: 16 consecutive positions, one member
    spm = open_dataset(tiny_dataset).manifest["seqs_per_member"]
    member_of_first = [i // spm for i in e0[:spm]]
    assert len(set(member_of_first)) <= 2
    # resume exactly at the end of epoch 0 lands at the start of epoch 1
    fresh = ResumableLoader(tiny_dataset, micro_batch_size=16, seed=5)
    step_ids(fresh, per_epoch)
    again = ResumableLoader(tiny_dataset, micro_batch_size=16, seed=5)
    again.load_state_dict(fresh.state_dict())
    assert [i for s in step_ids(again, 3) for i in s] == e1[:48]


def test_iterate_sequences_is_fixed_order_and_split_by_rank(tiny_dataset):
    info = open_dataset(tiny_dataset)
    n = info.num_sequences("val")
    full = [x for x, _, _ in iterate_sequences(tiny_dataset, "val", batch_size=7)]
    assert sum(x.shape[0] for x in full) == n
    halves = [
        torch.cat(
            [
                x
                for x, _, _ in iterate_sequences(
                    tiny_dataset, "val", batch_size=5, dp_rank=r, dp_size=2
                )
            ]
        )
        for r in range(2)
    ]
    assert torch.equal(torch.cat(halves), torch.cat(full))
    capped = list(iterate_sequences(tiny_dataset, "val", batch_size=4, max_sequences=10))
    assert [x.shape for x, _, _ in capped] == [torch.Size([4, info.seq_len])] * 2 + [
        torch.Size([2, info.seq_len])
    ]
    assert torch.equal(torch.cat([ids for _, _, ids in capped]), torch.arange(10))
    x, y, _ = capped[0]
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(y.max()) < info.vocab_size
    assert (
        info.manifest_sha256
        == __import__("hashlib").sha256((tiny_dataset / "manifest.json").read_bytes()).hexdigest()
    )


def test_shards_are_standard_webdataset(tiny_dataset, tmp_path):
    """Shards are what WebDataset's own TarWriter writes (same bytes) and its streaming reader
    yields exactly the stored sequences."""
    import io

    import webdataset as wds

    from data_prep.shards import TAR_MODE, TAR_OWNER, write_tar_members

    info = open_dataset(tiny_dataset)
    shard = info.manifest["splits"]["train"]["shards"][0]
    ours = (tiny_dataset / shard["path"]).read_bytes()
    reader = SplitReader(info, "train")
    members = [(f"{m:010d}.npy", reader.member(m)) for m in range(5)]
    buf, theirs = io.BytesIO(), io.BytesIO()
    from data_prep.shards import npy_bytes

    write_tar_members(buf, [(name, npy_bytes(a)) for name, a in members])
    writer = wds.TarWriter(
        theirs, encoder=False, mtime=0.0, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE
    )
    for name, a in members:
        writer.write({"__key__": name[:-4], "npy": npy_bytes(a)})
    writer.close()
    assert buf.getvalue() == theirs.getvalue()
    assert ours.startswith(buf.getvalue()[: 512 * 3])  # same header layout as the real shard
    urls = [str(tiny_dataset / s["path"]) for s in info.manifest["splits"]["train"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    streamed = np.concatenate([sample["npy"] for sample in ds])
    assert np.array_equal(streamed, reader.sequences(np.arange(reader.num_sequences)))
