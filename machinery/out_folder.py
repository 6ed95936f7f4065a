"""Writing into --out safely: whole files or none, one writer at a time, a full disk in one line.

Every file a run or an export writes goes through write_atomic: a temp beside it, then one
os.replace, so a crash mid-write leaves the previous file whole. One run writes into a folder at
a time: it holds an flock of .NAME.lock beside it (lock_out), which the OS lets go when the run
dies. A full disk, or a file-size limit, is one line naming the file (WriteFailed), exit 1.
"""
import errno
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


# ----------------------------------------------------------------------------- whole or not at all

def write_atomic(path, write, folder=False):
    """write(tmp) fills a temp file (a temp folder with folder=True) beside `path`, which then
    takes `path`'s place in one os.replace (atomic within one filesystem). A crash mid-write
    leaves the previous file whole (at worst a hidden .NAME.*.tmp, which train.py --resume
    deletes); an error mid-write deletes the temp. A non-empty folder is never replaced
    (FileExistsError). Returns path."""
    path = Path(path)
    if folder:
        check_out_dir(path)  # before writing anything
    path.parent.mkdir(parents=True, exist_ok=True)
    names = dict(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if folder:
        tmp = Path(tempfile.mkdtemp(**names))
    else:
        fd, tmp = tempfile.mkstemp(**names)
        os.close(fd)
        tmp = Path(tmp)
    existed = path.exists()
    try:
        try:
            write(tmp)
        except Exception as e:  # a full disk: one line, not torch's "unexpected pos 204672 ..."
            raise_if_disk_full(path, e, "the one written before is kept whole" if existed
                               else "nothing was left in its place")
            raise
        # mkstemp, mkdtemp and safetensors make what they create private to us (0600, 0700).
        for p in [tmp, *tmp.rglob("*")] if folder else [tmp]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.replace(tmp, path)  # a folder may replace an empty one (checked above)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


# The errors of a write that the disk refused: full, a file-size limit, a quota, the device.
DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO)


class WriteFailed(OSError):
    """A file the disk refused to hold: the run failed (exit 1), its input was fine."""


def raise_if_disk_full(path, error, kept):
    """WriteFailed naming `path`, the cause and what is `kept`, when `error` (or an error under
    it) is one of DISK_ERRORS; else nothing (the caller raises `error` as it is). torch.save says
    "unexpected pos 204672 vs 204560" over the OSError of the write that failed; safetensors says
    "(os error 28)" in its message."""
    cause, seen = error, 0
    while cause is not None and seen < 20:
        number = cause.errno if isinstance(cause, OSError) else None
        if number is None and (found := re.search(r"\(os error (\d+)\)", str(cause))):
            number = int(found.group(1))
        if number in DISK_ERRORS:
            why = os.strerror(number)
            raise WriteFailed(f"{path}: not written, {why[0].lower()}{why[1:]} (errno {number}); "
                              f"{kept}") from None
        cause, seen = cause.__cause__ or cause.__context__, seen + 1


def check_out_dir(out_dir):
    out_dir = Path(out_dir)
    check_out_path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite it")


def check_out_path(out):
    """Refuse an --out that cannot become a folder, naming it and what is wrong: a symbolic link
    to nothing, or a path under a file. Checked before a model loads, not at the first write."""
    out = Path(out)
    for path in [out, *out.parents]:
        if os.path.islink(path) and not path.exists():
            what = "" if path == out else f"{path} is "
            raise NotADirectoryError(f"--out {out}: {what}a symbolic link to "
                                     f"{os.readlink(path)}, which does not exist")
        if path.exists():
            if path != out and not path.is_dir():
                raise NotADirectoryError(f"--out {out}: {path} is a file, not a folder")
            return


# ---------------------------------------------------------------------------- one writer at a time

_held = []  # the locks this process holds: (descriptor, lock file, folders made for it)


def lock_out(out, prog):
    """Hold --out for this process alone until release_out_locks(), so that a second train.py
    (or export) into the same folder is refused while the first writes. The lock is an flock of
    .NAME.lock beside `out` (in its parent: --overwrite moves `out` aside, the lock stays), which
    the OS drops when the process dies however it dies: a killed run leaves nothing stuck.
    BlockingIOError naming the holder's command and pid when another process holds it."""
    real = Path(os.path.realpath(out))  # two names for one folder are one lock
    name = real.name if len(real.name) < 240 else hashlib.sha256(real.name.encode()).hexdigest()
    lock = real.parent / f".{name}.lock"
    made = [p for p in [real.parent, *real.parent.parents] if not p.exists()]
    while True:
        try:
            real.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            release_made(made)
            raise OSError(f"--out {out}: cannot create its lock file {lock}: "
                          f"{e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "another process"
            os.close(fd)
            release_made(made)
            raise BlockingIOError(f"--out {out}: {holder} is writing into it; wait for it to "
                                  "end, or pass another --out") from None
        try:  # the holder before us may have removed the file we locked: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{prog} (pid {os.getpid()})".encode())
    _held.append((fd, lock, made))


def release_out_locks():
    """Let go of every --out this process holds (command.py calls it as a script ends): the lock
    file is removed while still locked, then closed, and the folders made for it if empty."""
    while _held:
        fd, lock, made = _held.pop()
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)
        release_made(made)


def release_made(folders):
    for folder in folders:  # the deepest first; one still in use keeps those above it
        try:
            folder.rmdir()
        except OSError:
            break


def remove_stale_temps(out, prog):
    """With the lock of `out` held: remove the temp folders of earlier writers into it that were
    killed mid-write (write_atomic's .NAME.XXXXXXXX.tmp beside it, which no live writer can own
    now), saying so in one line each."""
    out = Path(out)
    temp = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp")  # mkdtemp's 8 letters
    for tmp in sorted(p for p in out.parent.iterdir() if temp.fullmatch(p.name)):
        if tmp.is_dir() and not tmp.is_symlink():
            size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            shutil.rmtree(tmp)
            size = f"{size} bytes" if size < 10**6 else f"{size / 10**6:.0f} MB"
            print(f"{prog}: removed {tmp} ({size}), the temp folder of an export into {out} "
                  "that was killed", file=sys.stderr)
