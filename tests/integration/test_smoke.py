from blobstore.client import Storage


def test_set_then_get_round_trips_a_string(storage: Storage) -> None:
    storage.set("test", "Hello Storage")
    assert storage.get("test") == b"Hello Storage"
