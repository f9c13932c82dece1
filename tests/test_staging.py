"""export.staging: exclusive, atomic exports; killed exports leave nothing behind for long."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from export.staging import ExportBusyError, Staged, rewrite_manifest, write_manifest
from runtime.bundle import Bundle, check_files, read_manifest

from conftest import ROOT, run_job

# A child that stages a bundle of `version` into `out` and stops at `stage`
# (printing "ready"), to be SIGKILLed there; with stage "done" it commits and
# exits; with "hold" it waits for a line on stdin, then commits.
_CHILD = r"""
import os, shutil, sys, tempfile
import flexjax.io
from export import staging
from export.staging import Staged, write_manifest

out, version, stage = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def stop(at):
    if stage == at:
        print("ready", flush=True)
        sys.stdin.readline()  # the test kills us here (or says go on)

real_mkdtemp, real_rmtree, real_rename = tempfile.mkdtemp, shutil.rmtree, os.rename

def mkdtemp(*a, **k):
    stop("locked")
    return real_mkdtemp(*a, **k)

def rmtree(path, *a, **k):
    if stage == "deleting_old" and os.path.isdir(path):
        names = sorted(os.listdir(path))
        for n in names[: len(names) // 2]:
            os.unlink(os.path.join(path, n))
    stop("swapped")
    stop("deleting_old")
    return real_rmtree(path, *a, **k)

renames = []
def rename(a, b):
    real_rename(a, b)
    renames.append(b)
    if len(renames) == 1:
        stop("fallback_moved_away")

tempfile.mkdtemp, shutil.rmtree = mkdtemp, rmtree
if stage == "fallback_moved_away":
    flexjax.io.exchange_paths = lambda a, b: False
    flexjax.io.os.rename = rename
staged = Staged(out, overwrite=True)
stop("staging")
for i in range(4):
    with open(os.path.join(staged.dir, f"part{i}.bin"), "wb") as f:
        f.write(bytes([version]) * (1000 + i))
stop("written")
write_manifest(staged.dir, {"version": version})
stop("sealed")
staged.commit()
stop("committed")
print("done", flush=True)
"""

STAGES = ["locked", "staging", "written", "sealed", "swapped", "deleting_old"]


def _env():
    return {**os.environ, "PYTHONPATH": ROOT}


def _start(out, version, stage) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out), str(version), stage],
        env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    line = proc.stdout.readline().strip()
    assert line == "ready", proc.stderr.read()
    return proc


def _write_bundle(out, version: int, overwrite: bool = True) -> None:
    staged = Staged(str(out), overwrite)
    try:
        for i in range(4):
            with open(os.path.join(staged.dir, f"part{i}.bin"), "wb") as f:
                f.write(bytes([version]) * (1000 + i))
        write_manifest(staged.dir, {"version": version})
        staged.commit()
    except BaseException:
        staged.abort()
        raise


def _version(out) -> int:
    """The version of the whole bundle at `out` (manifest, digest and every file checked)."""
    m = read_manifest(str(out))
    check_files(str(out), m)
    return m["version"]


def test_staged_second_export_to_held_out_fails_fast_with_one_line(tmp_path):
    out = tmp_path / "b"
    holder = _start(out, 1, "sealed")
    with pytest.raises(ExportBusyError) as e:
        Staged(str(out), overwrite=True)
    message = str(e.value)
    assert "\n" not in message
    assert f"another export (pid {holder.pid}) is writing {out}" in message
    # the CLI says the same in one line and exits 1, before converting anything
    proc = run_job("export.sweep", "--size=smoke", f"--out={out}", "--overwrite")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"error: another export (pid {holder.pid})")
    )
    holder.communicate("go\n")
    assert holder.returncode == 0
    assert _version(out) == 1
    assert sorted(os.listdir(tmp_path)) == ["b"]  # lock file and staging gone


def test_staged_two_racing_exports_exactly_one_wins(tmp_path):
    out = tmp_path / "b"
    # both stop right after taking (or failing to take) the lock; the loser exits at once
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(out), str(v), "staging"],
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for v in (1, 2)
    ]
    first = [p.stdout.readline().strip() for p in procs]
    assert sorted(first) == ["", "ready"]  # one holds the lock, the other failed
    winner = procs[first.index("ready")]
    loser = procs[first.index("")]
    loser.wait()
    assert loser.returncode != 0
    assert "ExportBusyError: another export" in loser.stderr.read()
    winner.communicate("go\n")
    assert winner.returncode == 0
    assert _version(out) == 1 + first.index("ready")


def test_existence_is_checked_under_the_lock(tmp_path):
    out = tmp_path / "b"
    _write_bundle(out, 1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        Staged(str(out), overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["b"]  # the lock is released and removed


@pytest.mark.parametrize("kind", ["symlink", "file", "not_a_bundle"])
def test_staged_refuses_destinations_it_must_not_replace(tmp_path, kind):
    real = tmp_path / "real"
    _write_bundle(real, 1)
    out = tmp_path / "out"
    if kind == "symlink":
        out.symlink_to(real)
    elif kind == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FileExistsError) as e:
        Staged(str(out), overwrite=True)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == before
    assert _version(real) == 1


def test_overwrite_never_leaves_out_missing_or_half_written(tmp_path):
    out = tmp_path / "b"
    _write_bundle(out, 0)
    stop = tmp_path / "stop"
    # A reader process polls `out` through a directory descriptor: a snapshot
    # that fails must be of a tree already swapped out (then retried), never
    # of the bundle at `out`.
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(out), str(stop)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader.stdout.readline().strip() == "ready"
    replacements = 150
    for v in range(1, replacements + 1):
        _write_bundle(out, v % 256)
    stop.write_text("")
    stdout, stderr = reader.communicate()
    assert reader.returncode == 0, stderr
    report = json.loads(stdout)
    print(f"reader over {replacements} replacements: {report}")
    assert report["missing"] == 0 and report["broken"] == [], report
    assert report["whole"] >= 1
    assert _version(out) == replacements % 256
    assert sorted(os.listdir(tmp_path)) == ["b", "stop"]


_READER = r"""
import json, os, sys
from runtime.bundle import BundleError, check_files, read_manifest

out, stop = sys.argv[1], sys.argv[2]
whole, retired, missing, broken, versions = 0, 0, 0, [], set()
first = True
while first or not os.path.exists(stop):
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        missing += 1
        continue
    try:
        snap = f"/proc/self/fd/{fd}"
        try:
            m = read_manifest(snap)
            check_files(snap, m)
            whole += 1
            versions.add(m["version"])
        except (BundleError, OSError) as e:
            mine = os.fstat(fd)
            try:
                now = os.stat(out)
            except FileNotFoundError:
                missing += 1
                continue
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                broken.append(str(e))
            else:
                retired += 1  # swapped out (and being deleted) while we read it
    finally:
        os.close(fd)
    if first:
        print("ready", flush=True)
        first = False
print(json.dumps({"whole": whole, "retired": retired, "missing": missing,
                  "broken": broken[:3], "versions": len(versions)}))
"""


@pytest.mark.parametrize("stage", STAGES)
def test_export_killed_at_each_stage_keeps_a_whole_bundle_and_next_run_cleans(tmp_path, stage):
    out = tmp_path / "b"
    _write_bundle(out, 1)
    proc = _start(out, 2, stage)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    # a whole bundle is at `out` at every stage: the old one until the swap, then the new one
    assert _version(out) == (2 if stage in ("swapped", "deleting_old") else 1)
    leftovers = sorted(set(os.listdir(tmp_path)) - {"b"})
    if stage != "locked":
        assert any(n.startswith(".b.tmp-") for n in leftovers), leftovers
    # the next export to `out` removes them as soon as it holds the lock, even if it fails
    staged = Staged(str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["b", ".b.lock", os.path.basename(staged.dir)])
    staged.abort()
    assert sorted(os.listdir(tmp_path)) == ["b"]
    _write_bundle(out, 3)
    assert _version(out) == 3 and sorted(os.listdir(tmp_path)) == ["b"]


def test_fallback_replacement_killed_between_renames_is_put_back(tmp_path):
    # Where renameat2 is missing, replace_dir moves the old bundle away first:
    # killed there, `out` is missing until the next export puts it back.
    out = tmp_path / "b"
    _write_bundle(out, 1)
    proc = _start(out, 2, "fallback_moved_away")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not out.exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        Staged(str(out), overwrite=False)  # the old bundle is back, so it exists
    assert _version(out) == 1 and sorted(os.listdir(tmp_path)) == ["b"]


def test_rewrite_manifest_of_a_real_bundle_is_exclusive_and_swapped_whole(smoke_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(smoke_bundle, out)
    manifest = Bundle.from_dir(str(out)).manifest
    holder = _start(out, 9, "locked")  # another export holds `out`
    with pytest.raises(ExportBusyError, match="another export"):
        rewrite_manifest(str(out), {**manifest, "note": "x"})
    holder.kill()
    holder.communicate()
    assert "note" not in Bundle.from_dir(str(out)).manifest
    rewrite_manifest(str(out), {**manifest, "note": "x"})
    assert Bundle.from_dir(str(out)).manifest["note"] == "x"
    assert sorted(os.listdir(tmp_path)) == ["b"]
