"""The commit protocol on the file system: marker, rename, `latest`, keep-K, leftovers."""
import os

from engine.checkpoint import storage


def _save(root, step):
    """What a save does after DCP has written the data: files, marker, rename, pointer."""
    tmp = os.path.join(root, storage.tmp_dirname(step))
    os.makedirs(tmp)
    for name in ("__0_0.distcp", storage.META_FILE, storage.DCP_METADATA):
        with open(os.path.join(tmp, name), "w") as fh:
            fh.write(f"{name} {step}")
    files = storage.describe_files(tmp, sorted(os.listdir(tmp)))
    return storage.commit(root, tmp, storage.step_dirname(step), files, step)


def test_keep_last_never_removes_latest_and_removes_marker_first(tmp_path):
    root = str(tmp_path)
    for step in (10, 20, 30, 40):
        _save(root, step)
    assert storage.read_latest(root).endswith("step_000000040")
    removed = storage.prune(root, keep_last=2)
    assert [os.path.basename(p) for p in removed] == ["step_000000010", "step_000000020"]
    assert [os.path.basename(p) for p in storage.list_complete(root)] == ["step_000000030", "step_000000040"]
    # `latest` names an older checkpoint (a crash after a rename): that one is kept whatever K says
    storage.update_latest(root, "step_000000030")
    _save(root, 50)
    storage.update_latest(root, "step_000000030")
    storage.prune(root, keep_last=1)
    assert [os.path.basename(p) for p in storage.list_complete(root)] == ["step_000000030", "step_000000050"]
    assert storage.verify_files(storage.read_latest(root)) == []


def test_latest_falls_back_to_newest_complete_and_ignores_partial(tmp_path):
    root = str(tmp_path)
    assert storage.read_latest(root) is None
    _save(root, 1)
    _save(root, 2)
    os.makedirs(os.path.join(root, storage.tmp_dirname(3)))  # an interrupted save
    os.makedirs(os.path.join(root, "step_000000004"))  # a half-removed one: no marker
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write("step_000000004\n")
    assert storage.read_latest(root).endswith("step_000000002")
    os.remove(os.path.join(root, "latest"))
    assert storage.read_latest(root).endswith("step_000000002")
    storage.remove_stale_tmp(root)
    assert not os.path.exists(os.path.join(root, storage.tmp_dirname(3)))
    storage.remove_checkpoint(os.path.join(root, "step_000000002"))
    assert storage.read_latest(root).endswith("step_000000001")


def test_resaving_a_step_replaces_the_old_directory(tmp_path):
    root = str(tmp_path)
    _save(root, 5)
    final = _save(root, 5)
    assert storage.verify_files(final) == []
    assert sorted(os.listdir(root)) == ["latest", "step_000000005"]
