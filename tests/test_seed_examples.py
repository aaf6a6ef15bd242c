"""Every example of the seed README, with its exact imports, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapperable import Snapper
from snapperable.storage.pickle_storage import PickleSnapshotStorage
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage


def process_item(item: int) -> int:
    return item * 2


def test_overview_example_uses_default_sqlite_file(in_tmp: Path) -> None:
    snapper = Snapper(range(1000), process_item)
    snapper.start()
    snapper.start()  # resuming a finished run processes nothing and raises nothing
    results = snapper.load()
    assert results == [i * 2 for i in range(1000)]
    assert (in_tmp / "snapper_checkpoint.db").exists()


def test_dynamic_iterable_example(in_tmp: Path) -> None:
    # `calls` is instrumentation; it is pinned out of the fingerprint with version=,
    # since a closure value (this growing list) is part of the function version.
    calls: list[int] = []

    def counted(item: int) -> int:
        calls.append(item)
        return item * 2

    storage: PickleSnapshotStorage[int] = PickleSnapshotStorage("checkpoint.pkl")
    data_v1 = [1, 2, 3, 4, 5]
    with Snapper(data_v1, counted, snapshot_storage=storage, version="1") as snapper:
        snapper.start()
    data_v2 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    with Snapper(data_v2, counted, snapshot_storage=storage, version="1") as snapper:
        snapper.start()  # Only processes items 6-10
        results = snapper.load()  # Returns all 10 results
    assert calls == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert results == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]

    with Snapper([1, 2, 3], counted, snapshot_storage=storage, version="1") as snapper:
        matching_results = snapper.load()
        all_results = snapper.load_all()
    assert matching_results == [2, 4, 6]
    assert all_results == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def test_load_methods_example(in_tmp: Path) -> None:
    storage: PickleSnapshotStorage[int] = PickleSnapshotStorage("checkpoint.pkl")
    with Snapper([1, 2, 3, 4, 5], process_item, snapshot_storage=storage) as snapper:
        snapper.start()
    with Snapper([1, 2, 3], process_item, snapshot_storage=storage) as snapper:
        assert snapper.load() == [2, 4, 6]
        assert snapper.load_all() == [2, 4, 6, 8, 10]


def test_function_version_detection_example(in_tmp: Path) -> None:
    storage: PickleSnapshotStorage[int] = PickleSnapshotStorage("checkpoint.pkl")

    def process_v1(x: int) -> int:
        return x * 2

    snapper = Snapper([1, 2, 3], process_v1, snapshot_storage=storage)
    snapper.start()
    assert snapper.load() == [2, 4, 6]

    def process_v2(x: int) -> int:
        return x * 3

    snapper = Snapper([1, 2, 3], process_v2, snapshot_storage=storage)
    snapper.start()  # Reprocesses all items
    assert snapper.load() == [3, 6, 9]


@pytest.mark.parametrize("storage_class", [SQLiteSnapshotStorage, PickleSnapshotStorage])
def test_storage_class_examples(in_tmp: Path, storage_class: type) -> None:
    storage: SQLiteSnapshotStorage[int] | PickleSnapshotStorage[int]
    if storage_class is SQLiteSnapshotStorage:
        storage = SQLiteSnapshotStorage(db_path="my_checkpoint.db")
        path = in_tmp / "my_checkpoint.db"
    else:
        storage = PickleSnapshotStorage(file_path="my_checkpoint.pkl")
        path = in_tmp / "my_checkpoint.pkl"
    snapper = Snapper(range(1000), process_item, snapshot_storage=storage)
    snapper.start()
    assert path.exists()
    assert Snapper(range(1000), process_item, snapshot_storage=storage).load()[-1] == 1998


def test_default_paths(in_tmp: Path) -> None:
    assert SQLiteSnapshotStorage().path == str(in_tmp / "snapper_checkpoint.db")
    assert PickleSnapshotStorage().path == str(in_tmp / "snapper_checkpoint.pkl")
    with Snapper([1], process_item, snapshot_storage=PickleSnapshotStorage()) as snapper:
        snapper.start()
    assert (in_tmp / "snapper_checkpoint.pkl").exists()


def test_batch_processing_configuration(in_tmp: Path) -> None:
    snapper = Snapper(range(10000), process_item, batch_size=100, max_wait_time=30.0)
    snapper.start()
    assert snapper.load() == [i * 2 for i in range(10000)]


def test_storages_are_subscriptable_and_exported() -> None:
    import snapperable

    assert snapperable.SQLiteSnapshotStorage is SQLiteSnapshotStorage
    assert snapperable.PickleSnapshotStorage is PickleSnapshotStorage
    assert isinstance(SQLiteSnapshotStorage[int]("x.db"), SQLiteSnapshotStorage)
    assert isinstance(PickleSnapshotStorage[int]("x.pkl"), PickleSnapshotStorage)
