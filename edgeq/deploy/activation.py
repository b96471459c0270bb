"""Switching models under the device lock: activate, roll back, and -- when the link goes down mid-switch --
reconnect, read back what is active and say it (a switch is never hidden)."""

from __future__ import annotations

from typing import Any, Optional

from edgeq._device import protocol
from edgeq.deploy.options import DeployOptions, check_options
from edgeq.deploy.results import RollbackResult
from edgeq.device import DeviceClient, DeviceLock
from edgeq.errors import ConnectError, DeviceError
from edgeq.progress import ProgressCallback, report
from edgeq.transport import Transport, make_transport


def _read_back(options: DeployOptions, python: str, remote_dir: str) -> dict[str, Any]:
    """What the device reports as active, over a new connection (bounded): the old one is gone."""
    with make_transport(options.host, options.ssh) as tr:
        return DeviceClient(tr, python).state(remote_dir, min(options.probe_timeout, 30.0))


def _release_over_new_link(options: DeployOptions, python: str, lock: DeviceLock) -> None:
    """Best effort: give back this deploy's lock over a new connection (the next deploy need not break it)."""
    try:
        with make_transport(options.host, options.ssh) as tr:
            DeviceClient(tr, python).release(lock, options.cleanup_timeout)
    except DeviceError:
        pass


def _where(now: dict[str, Any], sha: str) -> str:
    cur = now.get("current")
    text = (f"current = {str(cur or 'none')[:12]}" + (" (the new model IS active)" if cur == sha else "")
            + f", previous = {str(now.get('previous') or 'none')[:12]}")
    if now.get("foreign"):
        text += f" (current is {str(now['foreign'])[:200]})"
    return text


def _link_lost(dev: DeviceClient, lock: DeviceLock, sha: Optional[str], options: DeployOptions,
               exc: ConnectError) -> ActivationUnknown:
    """The link went down while switching models (activating ``sha``, or rolling back when ``sha`` is None): the
    switch may have happened. Reconnect, read back what is active, give the lock back and say it."""
    host = dev.host
    doing = f"activating {sha[:12]}" if sha else "rolling back"
    try:
        now = _read_back(options, dev.python, lock.remote_dir)
    except DeviceError as exc2:
        return ActivationLinkDown(
            f"the link to {host} was lost while {doing} ({exc.message}) and the active model could not be read "
            f"back ({exc2.message}): " + (f"{sha[:12]} may be active" if sha else "the rollback may have happened"),
            host=host, hint="check with `edgeq deploy --no-activate` (it reports the active model)"
            + (" or `edgeq rollback`" if sha else ""))
    _release_over_new_link(options, dev.python, lock)
    message = f"the link to {host} was lost while {doing}; on reconnecting the device reports {_where(now, sha or '')}"
    if sha is None:
        hint = "run `edgeq rollback` again if this is not the model you want"
    elif now.get("current") == sha:
        hint = "`edgeq rollback` switches back"
    else:
        message += f": {sha[:12]} is not active"
        hint = "check the link and deploy again"
    return ActivationUnknown(message, hint=hint, host=host, active=now)


def activate_model(dev: DeviceClient, lock: DeviceLock, sha: str, options: DeployOptions,
              before: dict[str, Any]) -> dict[str, Any]:
    """Activate ``sha``; after any failure, read back what is active and say it (a switch is never hidden)."""
    try:
        doc = dev.activate(lock, sha, options.probe_timeout, options.keep)
    except ConnectError as exc:
        if dev.tr.cancelled:
            raise  # a fleet gave up on this host; it reads back what is active itself
        raise _link_lost(dev, lock, sha, options, exc) from None
    except DeviceError as exc:
        try:
            now = dev.state(lock.remote_dir, min(options.probe_timeout, 30.0))
        except ConnectError as exc2:
            raise _link_lost(dev, lock, sha, options, exc2) from None
        except DeviceError as exc2:
            raise ActivationUnknown(
                f"activating {sha[:12]} on {dev.host} failed ({exc}) and the active model could not be read "
                f"back ({exc2}); it may or may not be active", hint="check with `edgeq deploy --no-activate` or "
                "`edgeq rollback`", host=dev.host) from None
        if now.get("current") == sha and before.get("current") != sha:
            raise ActivationUnknown(
                f"activating {sha[:12]} on {dev.host} reported an error ({exc}), but the device now runs it: "
                f"current is {sha[:12]}, previous {str(now.get('previous') or '-')[:12]}",
                hint="`edgeq rollback` switches back", host=dev.host, active=now) from None
        unchanged = str(now.get("current") or "none")[:12]
        if now.get("foreign"):
            unchanged = f"current is {str(now['foreign'])[:200]}"
        raise DeviceError(f"{exc.message}; the active model is unchanged ({unchanged})", hint=exc.hint,
                          host=dev.host) from None
    act = protocol.activation_record(lock.remote_dir, doc["active"], doc["previous"], True, doc["switched"])
    if options.keep is not None:
        act["pruned"] = doc.get("pruned") or []
    return act


class ActivationUnknown(DeviceError):
    """Activation failed or could not be confirmed; ``active`` is what the device reports now (if read)."""

    def __init__(self, message: str, hint: Optional[str] = None, host: Optional[str] = None,
                 active: Optional[dict[str, Any]] = None) -> None:
        super().__init__(message, hint, host)
        self.active = active


class ActivationLinkDown(ActivationUnknown, ConnectError):
    """The link went down while switching models and did not come back: what is active is unknown, and the
    device lock could not be given back either (so it is also a ``ConnectError``)."""


def rollback(options: DeployOptions = DeployOptions(), progress: Optional[ProgressCallback] = None,
             transport: Optional[Transport] = None) -> RollbackResult:
    """Make ``REMOTE_DIR/previous`` the active model again (under the device lock)."""
    check_options(options)
    if transport is None:
        transport = make_transport(options.host, options.ssh)
    host = transport.host
    report(progress, "connect", f"connecting to {host}", host=host)
    with transport as tr:
        dev = DeviceClient(tr, options.device_python())
        report(progress, "lock", f"locking {options.remote_dir}", host=host)
        with dev.locked(options.remote_dir, options.probe_timeout, options.lock_stale_s,
                        options.probe_timeout * 3, options.cleanup_timeout) as lock:
            report(progress, "rollback", f"rolling back on {host}", host=host)
            try:
                doc = dev.rollback(lock, options.probe_timeout)
            except ConnectError as exc:
                if tr.cancelled:
                    raise  # a fleet gave up on this host; it reads back what is active itself
                raise _link_lost(dev, lock, None, options, exc) from None
            except DeviceError as exc:
                try:
                    now = dev.state(lock.remote_dir, min(options.probe_timeout, 30.0))
                    where = (f"the device now reports current = {str(now.get('current') or 'none')[:12]}, "
                             f"previous = {str(now.get('previous') or 'none')[:12]}")
                except DeviceError as exc2:
                    where = f"the active model could not be read back ({exc2.message})"
                raise DeviceError(f"{exc.message}; {where}", hint=exc.hint, host=host) from None
    return RollbackResult(host, lock.remote_dir, doc.get("active"), doc.get("previous"),
                          (doc.get("before") or {}).get("current"))
