"""The shell wire format: how an argument vector becomes the one string a device's SSH server runs.

Every argument is quoted for a POSIX ``sh``; the login shell (sh, bash, zsh,
fish, csh) gets ``exec sh -c '...'`` whose body is spelled with printf escapes,
so it means the same in all of them. The wire string is at most
``MAX_COMMAND_BYTES`` (Dropbear drops longer exec requests with the
connection); long data travel on the command's stdin instead. Also here: the
scripts edgeq runs around a command on the device (the pid marker a command
prints first, the kill of a timed-out command's process tree).
"""

from __future__ import annotations

import re
import shlex
from typing import Optional, Sequence

from edgeq.errors import CommandTooLong, UsageError
from edgeq.sandbox import BoundedBuffer

#: The longest command string edgeq sends to a device's SSH server (the wire string, after quoting and
#: octal escaping by ``wire_command``). Dropbear drops exec requests over 9,000 bytes (its MAX_CMD_LEN) and
#: the failure looks like a lost link; longer data travel on the command's stdin.
MAX_COMMAND_BYTES = 8000

# Characters that mean themselves, unquoted, in sh, bash, zsh, fish, csh and tcsh.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _./,:=+@-")


def short_command(command: str, limit: int = 300) -> str:
    """A command for a message: long argument lists are cut (the full one is on the error object)."""
    return command if len(command) <= limit else command[: limit - 1] + "…"


def check_command_length(command: str, host: str) -> str:
    """The wire string for the POSIX ``command``; ``CommandTooLong`` if it exceeds ``MAX_COMMAND_BYTES``."""
    wire = wire_command(run_script(command, "0" * 16))
    if len(wire) > MAX_COMMAND_BYTES:
        raise CommandTooLong(
            f"the command for {host} is {len(wire)} bytes once quoted for the SSH server, over edgeq's limit of "
            f"{MAX_COMMAND_BYTES} (Dropbear drops exec requests over 9,000 bytes); not sent: "
            f"{short_command(command, 120)}",
            hint="pass fewer or shorter arguments; long data must travel on the command's stdin", host=host)
    return wire


def _quote_program(program: str) -> str:
    # `~/venv/bin/python` is common on a Pi; quoting would stop the shell
    # expanding `~`, so spell it as "$HOME"/<quoted rest>.
    if program.startswith("~/"):
        return '"$HOME"/' + shlex.quote(program[2:])
    return shlex.quote(program)


def posix_command(argv: Sequence[str]) -> str:
    """``argv`` as one POSIX sh command, every argument quoted (``~/`` in the program kept expandable)."""
    if not argv:
        raise UsageError("empty command")
    for arg in argv:
        if "\0" in arg:
            raise UsageError(f"a command argument contains a NUL byte: {arg[:40]!r}")
    return " ".join([_quote_program(argv[0]), *(shlex.quote(a) for a in argv[1:])])


def wire_command(script: str) -> str:
    """The command string sent to the device's login shell to run the POSIX sh ``script``.

    sshd runs it as ``$SHELL -c <string>``, and login shells disagree on
    quoting (fish treats ``\\`` inside single quotes, csh newlines, ``$?`` means
    something else to both). So the string uses one construct they all read
    alike, ``exec sh -c '...'``, and inside the single quotes only characters
    that are literal everywhere: the script is spelled as a printf format with
    every other character as an octal escape, decoded and run by ``sh`` itself.
    """
    spelled = "".join(c if c in _SAFE else "".join(f"\\{b:03o}" for b in c.encode("utf-8")) for c in script)
    return "exec sh -c 'eval \"$(printf \"" + spelled + "\")\"'"


def run_script(command: str, nonce: str) -> str:
    """The sh script around ``command``: first ``EDGEQ-PID:<pid>:<nonce>`` on stderr (see ``PidMarker``)."""
    # $$ is this sh: sshd made it a session and process-group leader (setsid), and
    # `exec sh` kept that pid, so the host can kill the group -$$ on a timeout.
    # The command is not exec'd: its death by signal then shows as status 128+N
    # (paramiko ignores the SSH exit-signal message).
    return f"printf 'EDGEQ-PID:%s:{nonce}\\n' \"$$\" >&2\n{command}\nexit $?"


def kill_script(pid: int) -> str:
    """The sh script that kills the process tree of ``pid`` on the device and checks it is gone."""
    # Kill everything the command started, then check it is gone. The tree is
    # found in /proc (every descendant of the session shell, plus its process
    # group where the shell leads one, as under OpenSSH): Dropbear does not make
    # the session shell a group leader and BusyBox has no pkill. Each round stops
    # (SIGSTOP) what it found, so nothing forks while the tree is walked again;
    # then all of it is killed. Exit 0 when every process is gone (a zombie
    # counts as gone); otherwise exit 3 with "EDGEQ-ALIVE <pids>" on stdout.
    if pid <= 1:  # the walk below would take in every process on the device
        raise ValueError(f"refusing to kill the process tree of pid {pid}")
    return f"""root={pid}
all=" $root "
alive() {{
  if [ -r /proc/$1/stat ]; then
    {{ read -r line < /proc/$1/stat; }} 2>/dev/null || return 1
    set -- ${{line##*") "}}
    [ "$1" != Z ] && [ "$1" != X ]
  else
    [ -d /proc/self ] && return 1
    kill -0 "$1" 2>/dev/null
  fi
}}
i=0
while [ $i -lt 50 ]; do
  new=""
  for f in /proc/[0-9]*/stat; do
    p=${{f#/proc/}}; p=${{p%/stat}}
    case "$all" in *" $p "*) continue;; esac
    {{ read -r line < "$f"; }} 2>/dev/null || continue
    set -- ${{line##*") "}}
    case "$all" in *" $2 "*) new="$new $p "; continue;; esac
    [ "$3" = "$root" ] && new="$new $p "
  done
  kill -s STOP $all 2>/dev/null || kill -STOP $all 2>/dev/null
  [ -z "$new" ] && break
  all="$all$new"
  i=$((i + 1))
done
kill -s KILL -- -$root 2>/dev/null || kill -KILL -$root 2>/dev/null
kill -s KILL $all 2>/dev/null || kill -KILL $all 2>/dev/null
kill -s CONT $all 2>/dev/null || kill -CONT $all 2>/dev/null
n=0
while :; do
  left=""
  for p in $all; do alive "$p" && left="$left $p"; done
  if [ -z "$left" ]; then set -- $all; echo "EDGEQ-KILLED $#"; exit 0; fi
  n=$((n + 1))
  [ $n -gt 30 ] && break
  sleep 0.1 2>/dev/null || sleep 1
done
echo "EDGEQ-ALIVE$left"
exit 3"""


class PidMarker:
    """Finds (and removes) the ``EDGEQ-PID:<pid>:<nonce>`` line the wire script prints first on stderr."""

    _LIMIT = 64 * 1024  # login-shell noise before the marker; more than this and we stop looking

    def __init__(self, nonce: str, err: BoundedBuffer) -> None:
        self.pattern = re.compile(rb"EDGEQ-PID:(\d+):" + nonce.encode() + rb"\n")
        self.err = err
        self.pid: Optional[int] = None
        self._pending = bytearray()
        self._done = False

    def add(self, data: bytes) -> None:
        if self._done:
            self.err.add(data)
            return
        self._pending += data
        m = self.pattern.search(self._pending)
        if m:
            self.pid = int(m.group(1))
            rest = bytes(self._pending[: m.start()] + self._pending[m.end():])
            self._pending.clear()
            self._done = True
            if rest:
                self.err.add(rest)
        elif len(self._pending) > self._LIMIT:
            self.flush()

    def flush(self) -> None:
        if not self._done:
            self._done = True
            if self._pending:
                self.err.add(bytes(self._pending))
            self._pending.clear()
