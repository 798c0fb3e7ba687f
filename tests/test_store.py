import torch

from fedleak.core import Batch
from fedleak.store import RunStore


def test_rows_are_appended_and_the_header_widens(tmp_path):
    store = RunStore(tmp_path)
    store.append_row("r.csv", {"a": 1, "b": 2})
    store.append_row("r.csv", {"a": 3, "b": 4})
    store.append_row("r.csv", {"a": 5, "c": 6})
    assert store.rows("r.csv") == [
        {"a": "1", "b": "2", "c": ""},
        {"a": "3", "b": "4", "c": ""},
        {"a": "5", "b": "", "c": "6"},
    ]


def test_writes_leave_no_temporary_files_and_meta_merges(tmp_path):
    store = RunStore(tmp_path)
    store.update_meta(status="running")
    store.update_meta(seconds=1.5)
    assert store.meta() == {"status": "running", "seconds": 1.5}
    store.write_truth(1, 2, Batch(torch.ones(2, 1, 2, 2), torch.tensor([0, 1])))
    store.write_view(1, 2, {"w": torch.zeros(3)}, {"num_examples": 2}, {})
    assert store.observed() == [(1, 2)]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert torch.equal(store.truth(1, 2).labels, torch.tensor([0, 1]))
