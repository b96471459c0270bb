"""Device directories and the device lock: safe directories (real, owned, 0700), sha256 of files,
``install`` (verify then rename), and ``lock`` / ``refresh`` / ``unlock`` (atomic rename of a complete lock
directory, heartbeat, stale-lock breaking). Part of edgeq's on-device runner (see runner.py)."""

# A device module (standard library + numpy): on the device ``protocol.standalone`` installs it as
# ``edgeq_<name>`` ahead of the runner, after sys.path is cleaned; it must import nothing else before that.
import base64
import errno
import hashlib
import json
import os
import shutil
import stat
import shlex
import subprocess
import time

try:
    import edgeq_protocol as protocol  # sent ahead of the runner (protocol.standalone) or set up by the collection
except ImportError:
    try:
        from edgeq._device import protocol  # imported as a module of edgeq
    except ImportError:
        import protocol  # run as a script beside it (deploy/, tests)

facts = protocol.device_module("facts")

RunnerError = protocol.RunnerError


SUBDIRS = ("models", "data", "runner")


# ------------------------------------------------------------ safe directories

def resolve_remote_dir(text):
    if not text or not text.strip():
        raise RunnerError("the remote directory is empty", "usage")
    return os.path.abspath(os.path.expanduser(text))


def _check_dir(path, st):
    if stat.S_ISLNK(st.st_mode):
        raise RunnerError("%s is a symlink; edgeq refuses to follow it (remove the link, or pass a --remote-dir "
                          "that is a real directory of your own)" % path, "unsafe")
    if not stat.S_ISDIR(st.st_mode):
        raise RunnerError("%s is not a directory (remove it or pass another --remote-dir)" % path, "unsafe")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise RunnerError("%s is owned by uid %d, not by this user (uid %d); use a --remote-dir of your own"
                          % (path, st.st_uid, os.geteuid()), "unsafe")
    if st.st_mode & 0o022:
        raise RunnerError("%s is writable by group or others (mode %o); run `chmod go-w %s` on the device or use "
                          "another --remote-dir" % (path, stat.S_IMODE(st.st_mode), path), "unsafe")


def safe_dir(path, create=True):
    """Check (and with ``create`` make, mode 0700) a directory edgeq owns; never through a symlink."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT or not create:
            if exc.errno == errno.ENOENT:
                return False
            raise RunnerError("cannot inspect %s: %s" % (path, exc.strerror or exc), "io")
        parent = os.path.dirname(path)
        try:
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, 0o700)
            os.mkdir(path, 0o700)
        except OSError as exc2:
            if exc2.errno != errno.EEXIST:
                raise RunnerError("cannot create %s: %s" % (path, exc2.strerror or exc2), "io")
        st = os.lstat(path)
    _check_dir(path, st)
    return True


def safe_layout(remote_dir, create=True):
    """DIR and DIR/{models,data,runner}, each checked; returns ``remote_dir``."""
    if not safe_dir(remote_dir, create):
        return remote_dir
    for sub in SUBDIRS:
        safe_dir(os.path.join(remote_dir, sub), create)
    return remote_dir


def file_sha(path):
    """sha256 of a regular file (never through a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        return _sha256(path, sync=False)
    except (OSError, IOError):
        return None


# ------------------------------------------------------------------- install

def _sha256(path, sync=True):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def install(args):
    done = []
    for tmp, final, expected in args.item or []:
        try:
            st = os.lstat(tmp)
            if not stat.S_ISREG(st.st_mode):
                raise RunnerError("uploaded file %s is not a regular file" % tmp, "io")
            _check_dir(os.path.dirname(final), os.lstat(os.path.dirname(final)))
            actual = _sha256(tmp)
        except (OSError, IOError) as exc:
            raise RunnerError("cannot read uploaded file %s: %s" % (tmp, exc), "io")
        if actual != expected:
            unlink(tmp)
            raise RunnerError("checksum mismatch for %s: expected sha256 %s, got %s" % (final, expected, actual),
                              "checksum")
        try:
            os.replace(tmp, final)
            dfd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except (OSError, IOError) as exc:
            unlink(tmp)
            raise RunnerError("cannot move %s into place: %s" % (final, exc), "io")
        done.append(final)
    return {"ok": True, "mode": "install", "installed": done}


def unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------- lock, activation

LOCK_NAME = "lock"
OWNER_FILE = "owner.json"
HEARTBEAT_FILE = "heartbeat"
CLOCK_SLACK_S = 60.0  # a lock time further ahead than this was written by a clock that has since gone back


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def suffix():
    return base64.b16encode(os.urandom(6)).decode().lower()


def _boot_clock():
    """(boot id, seconds since boot) from /proc, or (None, None) where it does not say. Neither moves with the
    wall clock: NTP, a fake-hwclock restore or a hand-set date leave them alone."""
    boot = (facts.read_small("/proc/sys/kernel/random/boot_id", 64) or "").strip()
    try:
        up = float((facts.read_small("/proc/uptime", 64) or "").split()[0])
    except (IndexError, ValueError):
        up = None
    if not boot or up is None or not 0 <= up < 1e10:
        return None, None
    return boot, up


def _mark_age(wall, boot, up, now, boot_now, up_now):
    """Seconds since one lock timestamp (the lock's taking or a heartbeat), judged without trusting the wall clock
    to have only gone forward.

    Same boot: the device's uptime then and now (monotonic). An earlier boot: the lock is at least as old as this
    boot. Otherwise the wall clock; a time more than CLOCK_SLACK_S in the future was written by a clock that has
    since gone back and dates nothing, so the lock counts as old as this boot (or stays fresh where the device's
    uptime is unknown)."""
    wall_age = None if wall is None else now - wall
    if wall_age is not None and wall_age < -CLOCK_SLACK_S:
        wall_age = None
    if boot_now is not None:
        if boot == boot_now and up is not None:
            return max(0.0, up_now - up)
        if (boot and boot != boot_now) or wall_age is None:  # an earlier boot, or a time from the future
            return max(up_now, wall_age or 0.0)
    return max(0.0, wall_age or 0.0)


def _lock_owner(lock_dir):
    """The owner document of a lock directory, with its age (since it was taken or last refreshed) in ``age_s``."""
    path = os.path.join(lock_dir, OWNER_FILE)
    doc = None
    try:
        with open(path) as f:
            doc = json.loads(f.read(65536))
    except (OSError, IOError, ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    now = time.time()
    boot_now, up_now = _boot_clock()
    since = protocol.bounded_seconds(doc.get("since"))
    if since is None:
        try:
            since = os.stat(lock_dir).st_mtime
        except OSError:
            since = now
    boot = doc.get("boot_id") if isinstance(doc.get("boot_id"), str) else None
    ages = [_mark_age(since, boot, protocol.bounded_seconds(doc.get("uptime_s")), now, boot_now, up_now)]
    beat_path = os.path.join(lock_dir, HEARTBEAT_FILE)
    try:
        beat_wall = os.stat(beat_path).st_mtime
    except OSError:
        beat_wall = None
    if beat_wall is not None:
        beat = None
        try:
            with open(beat_path) as f:
                beat = json.loads(f.read(4096) or "null")
        except (OSError, IOError, ValueError, RecursionError):
            beat = None
        if not isinstance(beat, dict):
            beat = {}
        beat_boot = beat.get("boot_id") if isinstance(beat.get("boot_id"), str) else None
        ages.append(_mark_age(beat_wall, beat_boot, protocol.bounded_seconds(beat.get("uptime_s")), now, boot_now, up_now))
    doc["age_s"] = round(min(ages), 3)
    return doc


def _stale_after(owner, stale_after):
    """A lock is stale after ``stale_after`` s without a heartbeat, or after its holder's own deadline if longer."""
    ttl = owner.get("ttl_s")
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl == ttl and 0 < ttl < 10 ** 7:
        return max(stale_after, float(ttl))
    return stale_after


def _sweep(remote_dir):
    """Remove what a killed deploy left behind: temp uploads, temp links, broken locks. Never follows a symlink."""
    removed = 0
    for sub in SUBDIRS:
        top = os.path.join(remote_dir, sub)
        try:
            _check_dir(top, os.lstat(top))
        except (OSError, RunnerError):
            continue
        for root, dirs, files in os.walk(top, followlinks=False):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
            for name in files:
                full = os.path.join(root, name)
                if ".tmp-" in name and not os.path.islink(full):
                    unlink(full)
                    removed += 1
    for name in os.listdir(remote_dir):
        full = os.path.join(remote_dir, name)
        if name.startswith((".current.tmp-", ".previous.tmp-")):
            unlink(full)
            removed += 1
        elif name.startswith((LOCK_NAME + ".stale-", LOCK_NAME + ".new-")) and not os.path.islink(full):
            # Another deploy may be between steps with these right now: only old ones are leftovers.
            try:
                if time.time() - os.lstat(full).st_mtime < 300:
                    continue
            except OSError:
                continue
            shutil.rmtree(full, ignore_errors=True)
            removed += 1
    return removed


def _new_lock_dir(remote_dir, owner):
    """A complete lock directory (owner.json inside) at a temporary name, ready to be renamed into place."""
    tmp_dir = os.path.join(remote_dir, "%s.new-%s" % (LOCK_NAME, suffix()))
    try:
        os.mkdir(tmp_dir, 0o700)
        with open(os.path.join(tmp_dir, OWNER_FILE), "w") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, IOError) as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise RunnerError("cannot write the lock owner in %s: %s (is the disk full?)"
                          % (remote_dir, getattr(exc, "strerror", None) or exc), "io")
    return tmp_dir


def _take(tmp_dir, lock_dir):
    """Rename the complete lock directory into place; False when a (non-empty) lock is already there."""
    try:
        os.rename(tmp_dir, lock_dir)
        return True
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
            return False
        raise RunnerError("cannot create the lock %s: %s" % (lock_dir, exc.strerror or exc), "io")


def _break(lock_dir, stale_token):
    """Move a stale lock aside, atomically; only if the directory moved is the one judged stale.

    Two deploys that both saw the same stale lock race here: the first rename
    wins; a second rename that grabbed a *fresh* lock (whose token differs) is
    put back at once, so at most one deploy ever holds the lock.
    """
    aside = "%s.stale-%s" % (lock_dir, suffix())
    try:
        os.rename(lock_dir, aside)
    except OSError:
        return False
    if _lock_owner(aside).get("token") != stale_token:
        try:
            os.rename(aside, lock_dir)  # fails (non-empty target) only if a third deploy holds it by now
        except OSError:
            pass
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def lock(args):
    remote_dir = safe_layout(resolve_remote_dir(args.dir))
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    try:
        owner = json.loads(args.owner) if args.owner else {}
    except ValueError:
        raise RunnerError("--owner is not JSON", "usage")
    if not isinstance(owner, dict):
        raise RunnerError("--owner is not a JSON object", "usage")
    boot, up = _boot_clock()  # the lock's age is judged on these where the device has them (not the wall clock)
    owner.update({"token": args.token, "since": time.time(), "device_pid": os.getpid(), "boot_id": boot,
                  "uptime_s": up})
    if args.ttl is not None:
        owner["ttl_s"] = float(args.ttl)
    tmp_dir = _new_lock_dir(remote_dir, owner)
    broke = None
    try:
        for _attempt in range(3):
            if os.path.islink(lock_dir):
                raise RunnerError("%s is a symlink; edgeq refuses to follow it (remove it)" % lock_dir, "unsafe")
            if _take(tmp_dir, lock_dir):
                tmp_dir = None
                fsync_dir(remote_dir)
                return {"ok": True, "mode": "lock", "remote_dir": remote_dir, "broke_stale": broke,
                        "swept": _sweep(remote_dir)}
            current = _lock_owner(lock_dir)
            if args.race_hook:  # tests only: run a command (an argv, no shell) between reading and breaking
                subprocess.call(shlex.split(args.race_hook), stdout=subprocess.DEVNULL)
            limit = _stale_after(current, args.stale_after) if args.stale_after is not None else None
            stale = limit is not None and current["age_s"] > limit
            gone = bool(args.break_token) and current.get("token") == args.break_token
            if broke is None and (stale or gone) and current.get("token"):
                if _break(lock_dir, current.get("token")):
                    broke = current
                    broke["reason"] = ("older than %g s" % limit) if stale else "its holder is gone"
                continue
            return {"ok": False, "kind": "busy", "error": "the device is locked by another deploy",
                    "owner": current, "remote_dir": remote_dir}
        return {"ok": False, "kind": "busy", "error": "the device lock changed hands while breaking a stale one",
                "owner": _lock_owner(lock_dir), "remote_dir": remote_dir}
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def holds_lock(lock_dir, token):
    return bool(token) and _lock_owner(lock_dir).get("token") == token


def refresh(args):
    remote_dir = safe_layout(resolve_remote_dir(args.dir), create=False)
    guard(remote_dir, args.token)
    heartbeat(remote_dir)
    return {"ok": True, "mode": "refresh"}


def heartbeat(remote_dir):
    """Mark the lock as alive now: the file's time (wall clock) and, inside it, the boot id and uptime."""
    path = os.path.join(remote_dir, LOCK_NAME, HEARTBEAT_FILE)
    boot, up = _boot_clock()
    tmp = "%s.tmp-%s" % (path, suffix())
    try:
        with open(tmp, "w") as f:
            json.dump({"boot_id": boot, "uptime_s": up}, f)
        os.rename(tmp, path)
    except (OSError, IOError):
        unlink(tmp)
        try:  # a full disk: at least the file's time moves
            os.utime(path, None)
        except OSError:
            pass  # a full disk must not fail the deploy; the holder's ttl still protects the lock


def unlock(args):
    remote_dir = resolve_remote_dir(args.dir)
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    if os.path.islink(lock_dir) or not os.path.isdir(lock_dir):
        return {"ok": True, "mode": "unlock", "released": False}
    if not holds_lock(lock_dir, args.token):
        return {"ok": False, "kind": "lock", "error": "the lock is held by another deploy; not releasing it"}
    aside = "%s.stale-%s" % (lock_dir, suffix())
    try:
        os.rename(lock_dir, aside)  # atomic: the lock is gone at once, the rest is cleanup
    except OSError as exc:
        raise RunnerError("cannot release the lock %s: %s" % (lock_dir, exc.strerror or exc), "io")
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(remote_dir)
    return {"ok": True, "mode": "unlock", "released": not os.path.exists(lock_dir)}


def guard(remote_dir, token):
    lock_dir = os.path.join(remote_dir, LOCK_NAME)
    if os.path.islink(lock_dir) or not holds_lock(lock_dir, token):
        raise RunnerError("this deploy no longer holds the device lock (another deploy broke it as stale)", "lock")
