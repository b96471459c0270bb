"""Which model is current: ``activate`` / ``rollback`` / ``state`` and pruning of old models. The layout
(``DIR/current`` -> ``models/<sha256>``, the ``previous`` record) is described in runner.py.
Part of edgeq's on-device runner."""

# A device module (standard library + numpy): on the device ``protocol.standalone`` installs it as
# ``edgeq_<name>`` ahead of the runner, after sys.path is cleaned; it must import nothing else before that.
import os
import shutil
import stat

try:
    import edgeq_protocol as protocol  # sent ahead of the runner (protocol.standalone) or set up by the collection
except ImportError:
    try:
        from edgeq._device import protocol  # imported as a module of edgeq
    except ImportError:
        import protocol  # run as a script beside it (deploy/, tests)

device_state = protocol.device_module("device_state")

RunnerError = protocol.RunnerError


def _link_sha(remote_dir, name):
    try:
        target = os.readlink(os.path.join(remote_dir, name))
    except OSError:
        return None
    parts = target.rstrip("/").split("/")
    return parts[-1] if len(parts) == 2 and parts[0] == "models" and protocol.is_sha(parts[-1]) else None


PREVIOUS_RECORD = "previous"  # models/<sha>/previous: the model that was current when <sha> was made current


def _recorded_previous(remote_dir, sha):
    """(True, sha256 or None) from ``models/<sha>/previous``; (False, None) when there is no readable record
    (a model activated by an edgeq from before the record)."""
    path = os.path.join(remote_dir, "models", sha, PREVIOUS_RECORD)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False, None
        with open(path) as f:
            text = f.read(128).strip()
    except (OSError, IOError, ValueError):
        return False, None
    if not text:
        return True, None
    return (True, text) if protocol.is_sha(text) else (False, None)


def record_previous(remote_dir, sha, previous):
    """Write ``models/<sha>/previous`` (temp file, fsync, rename): read only once ``current`` points at sha."""
    folder = os.path.join(remote_dir, "models", sha)
    device_state.safe_dir(folder, create=False)
    path = os.path.join(folder, PREVIOUS_RECORD)
    tmp = "%s.tmp-%s" % (path, device_state.suffix())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write((previous or "") + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, IOError) as exc:
        device_state.unlink(tmp)
        raise RunnerError("cannot record the previous model in %s: %s" % (folder, exc.strerror or exc), "io")
    device_state.fsync_dir(folder)


def _foreign(remote_dir):
    """What ``current`` is when edgeq did not make it (a link outside models/, a file, a directory); else None."""
    path = os.path.join(remote_dir, "current")
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISLNK(st.st_mode):
        return "a directory" if stat.S_ISDIR(st.st_mode) else "a file, not a link"
    if _link_sha(remote_dir, "current"):
        return None
    try:
        return "a link to %s" % os.readlink(path)[:512]
    except OSError:
        return "a link"


def activation_state(remote_dir):
    """Which model is current and which previous (sha256 or None); ``foreign`` says what ``current`` is when
    edgeq did not make it.

    ``current`` (the link applications load) is the one commit point: the model it names carries its own
    ``previous`` record, written before the switch, so one rename changes both. A model activated by an older
    edgeq has no record; then the ``previous`` link is read (that layout keeps working)."""
    current = _link_sha(remote_dir, "current")
    doc = {"current": current, "previous": None}
    known = False
    if current:
        known, doc["previous"] = _recorded_previous(remote_dir, current)
    if not known:
        doc["previous"] = _link_sha(remote_dir, "previous")
    foreign = None if current else _foreign(remote_dir)
    if foreign:
        doc["foreign"] = foreign
    return doc


def _refuse_foreign(remote_dir, state, what):
    if state.get("foreign"):
        cur = os.path.join(remote_dir, "current")
        raise RunnerError("%s is %s, not a model edgeq deployed; edgeq will not %s over it: move it aside "
                          "(mv %s %s.mine) or use another --remote-dir" % (cur, state["foreign"], what, cur, cur),
                          "foreign")


def _new_link(remote_dir, name, sha):
    tmp = os.path.join(remote_dir, ".%s.tmp-%s" % (name, device_state.suffix()))
    try:
        os.symlink("models/" + sha, tmp)
    except OSError as exc:
        device_state.unlink(tmp)
        raise RunnerError("cannot create a link to %s: %s" % (sha[:12], exc.strerror or exc), "io")
    return tmp


def _switch(remote_dir, name, sha):
    """Point ``remote_dir/name`` at ``models/sha`` atomically: new link at a temp name, renamed over."""
    tmp = _new_link(remote_dir, name, sha)
    try:
        os.replace(tmp, os.path.join(remote_dir, name))
    except OSError as exc:
        device_state.unlink(tmp)
        raise RunnerError("cannot switch %s to %s: %s" % (name, sha[:12], exc.strerror or exc), "io")
    device_state.fsync_dir(remote_dir)


def _switch_both(remote_dir, current_sha, previous_sha):
    """Make ``current_sha`` current with ``previous_sha`` as its previous, in one atomic step.

    Every new file is made first (the steps a full disk fails), so a failure changes nothing: the previous
    record beside the new model (not read while that model is not current) and the new links. Then ``current``
    is renamed over, the one commit: a crash before it leaves the old pair, after it the new pair. The
    ``previous`` link is refreshed last, for readers of the older layout; the record is what counts."""
    record_previous(remote_dir, current_sha, previous_sha)
    new_cur = _new_link(remote_dir, "current", current_sha)
    new_prev = None
    committed = False
    try:
        if previous_sha:
            new_prev = _new_link(remote_dir, "previous", previous_sha)
        os.replace(new_cur, os.path.join(remote_dir, "current"))
        committed = True
    except OSError as exc:
        raise RunnerError("cannot switch to %s: %s" % (current_sha[:12], exc.strerror or exc), "io")
    finally:
        if not committed:
            for tmp in (new_cur, new_prev):
                if tmp:
                    device_state.unlink(tmp)
    device_state.fsync_dir(remote_dir)
    prev_link = os.path.join(remote_dir, "previous")
    try:
        if new_prev:
            os.replace(new_prev, prev_link)
        elif os.path.islink(prev_link):
            os.unlink(prev_link)
    except OSError:
        if new_prev:
            device_state.unlink(new_prev)
    device_state.fsync_dir(remote_dir)


def prune(remote_dir, keep, protect):
    """Delete all but the ``keep`` newest models (and those in ``protect``); never through a symlink."""
    models = os.path.join(remote_dir, "models")
    entries = []
    for name in os.listdir(models):
        full = os.path.join(models, name)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if protocol.is_sha(name) and stat.S_ISDIR(st.st_mode):
            entries.append((st.st_mtime, name))
    entries.sort(reverse=True)
    kept = set(n for _t, n in entries[:max(0, keep)]) | set(p for p in protect if p)
    removed = []
    for _t, name in entries:
        if name not in kept:
            aside = os.path.join(models, "%s.tmp-prune-%s" % (name, device_state.suffix()))
            try:
                os.rename(os.path.join(models, name), aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(name)
    return sorted(removed)


def activate(args):
    remote_dir = device_state.safe_layout(device_state.resolve_remote_dir(args.dir), create=False)
    if not protocol.is_sha(args.sha):
        raise RunnerError("not a sha256: %r" % args.sha, "usage")
    device_state.guard(remote_dir, args.token)
    model = os.path.join(remote_dir, "models", args.sha, "model.tflite")
    actual = device_state.file_sha(model)
    if actual != args.sha:
        raise RunnerError("%s does not match its sha256 (got %s); not activating it" % (model, actual), "checksum")
    before = activation_state(remote_dir)
    _refuse_foreign(remote_dir, before, "activate a model")
    switched = before["current"] != args.sha
    if switched:
        _switch_both(remote_dir, args.sha, before["current"])
    try:
        os.utime(os.path.join(remote_dir, "models", args.sha), None)  # newest, for --keep
    except OSError:
        pass
    after = activation_state(remote_dir)
    pruned = []
    if args.keep is not None:
        pruned = prune(remote_dir, args.keep, (after["current"], after["previous"]))
    return {"ok": True, "mode": "activate", "switched": switched, "active": after["current"],
            "previous": after["previous"], "before": before, "pruned": pruned}


def rollback(args):
    remote_dir = device_state.safe_layout(device_state.resolve_remote_dir(args.dir), create=False)
    device_state.guard(remote_dir, args.token)
    before = activation_state(remote_dir)
    _refuse_foreign(remote_dir, before, "roll back")
    prev = before["previous"]
    if not prev:
        raise RunnerError("there is no previous model in %s to roll back to" % remote_dir, "rollback")
    if device_state.file_sha(os.path.join(remote_dir, "models", prev, "model.tflite")) != prev:
        raise RunnerError("the previous model %s is missing or corrupt in %s/models" % (prev[:12], remote_dir),
                          "rollback")
    _switch_both(remote_dir, prev, before["current"])
    after = activation_state(remote_dir)
    return {"ok": True, "mode": "rollback", "switched": True, "active": after["current"],
            "previous": after["previous"], "before": before}


def state(args):
    remote_dir = device_state.resolve_remote_dir(args.dir)
    return {"ok": True, "mode": "state", "remote_dir": remote_dir, "activation": activation_state(remote_dir)}
