"""Runs started together on a fresh checkout prepare the easy-vqa cache once: the second waits for the
first and reuses its files, so an index built by one is never invalidated by the other's rewrite (two
default runs started at once used to fail with "changed since its index was built")."""
import json
import multiprocessing as mp
import os


def _prepare(cache_dir, queue):
    from llava_san.data.easyvqa import prepare_easyvqa

    paths = prepare_easyvqa(cache_dir)
    st = os.stat(paths.train_records)
    queue.put((st.st_ino, st.st_mtime_ns))


def test_concurrent_prepares_write_the_cache_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare, args=(str(tmp_path / "easyvqa"), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    seen = {queue.get(timeout=5) for _ in procs}
    assert len(seen) == 1  # one train.json (same inode and mtime) for every process
    manifest = json.loads((tmp_path / "easyvqa" / "manifest.json").read_text())
    assert manifest["train_records"] == 38575


def test_lock_serialises_blocks(tmp_path):
    """The lock is exclusive: a second holder blocks until the first releases (non-blocking try fails)."""
    import fcntl

    from llava_san.utils.cache_lock import cache_lock

    with cache_lock(tmp_path):
        with open(tmp_path / ".lock", "a") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held_elsewhere = False
            except BlockingIOError:
                held_elsewhere = True
    assert held_elsewhere
    with open(tmp_path / ".lock", "a") as other:  # released after the block
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
