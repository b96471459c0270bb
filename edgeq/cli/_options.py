"""Option groups shared by the commands: one option, one meaning, one type, range and help, everywhere.

Each group is a decorator. The data and SSH groups also gather their values
into one object (``data: DataArgs``, ``ssh: SshArgs``) so a command receives
what it passes on, not a dozen loose parameters. Nothing here imports numpy,
paramiko or TensorFlow: ``edgeq --help`` reads this module.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import click

from edgeq.defaults import DEFAULT_SAMPLES

PASSPHRASE_ENV = "EDGEQ_SSH_PASSPHRASE"

F = Callable[..., Any]


def _apply(f: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):  # the first option listed is shown first in --help
        f = option(f)
    return f


# -- target -----------------------------------------------------------------------------------------------------

def target_option(required: bool = True) -> Callable[[F], F]:
    """``-t/--target NAME|FILE`` (the parameter is ``target``)."""
    return click.option("-t", "--target", "target", required=required, metavar="NAME|FILE",
                        help="Target profile: a name from `edgeq targets` (e.g. rpi4, cortex-m4) or a profile "
                             "TOML file.")


# -- data -------------------------------------------------------------------------------------------------------

def calib_option(required: bool = True) -> Callable[[F], F]:
    """``--calib DATA``."""
    return click.option("--calib", "calib", required=required, metavar="DATA",
                        help="Calibration data: .npy, .npz, a directory of images, or module:function.")


def eval_option(required: bool = False) -> Callable[[F], F]:
    """``--eval DATA`` (the parameter is ``eval_data``)."""
    return click.option("--eval", "eval_data", required=required, metavar="DATA",
                        help="Held-out data: one array per model input (or x) and labels in 'y' (y_<output> for "
                             "one output of several) for accuracy; without labels, top-1 agreement with float. "
                             "On a device: an .npz, or an .npy for one input.")


def train_option(required: bool = False) -> Callable[[F], F]:
    """``--train DATA`` (the parameter is ``train_data``)."""
    return click.option("--train", "train_data", required=required, metavar="DATA",
                        help="Labelled training data (.npz with the inputs and 'y') for quantization-aware "
                             "training.")


@dataclass(frozen=True)
class DataArgs:
    """``--samples/--mean/--std/--scale/--seed`` as given; ``options()`` checks them into ``DataOptions``."""

    samples: int = DEFAULT_SAMPLES
    mean: Optional[str] = None
    std: Optional[str] = None
    scale: Optional[float] = None
    seed: int = 0

    def options(self) -> Any:
        """The library's ``DataOptions`` (raises ``UsageError`` for bad numbers)."""
        from edgeq.calibration import DataOptions, parse_floats

        return DataOptions(samples=self.samples, seed=self.seed, mean=parse_floats(self.mean, "--mean"),
                           std=parse_floats(self.std, "--std"), scale=self.scale)


def sampling_options(f: F) -> F:
    """``--samples``, ``--mean``, ``--std``, ``--scale`` and ``--seed``, passed on as ``data: DataArgs``."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kw: Any) -> Any:
        kw["data"] = DataArgs(**{k: kw.pop(k) for k in ("samples", "mean", "std", "scale", "seed")})
        return f(*args, **kw)

    return _apply(wrapper, [
        click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
                     help="Calibration samples drawn (seeded) from --calib."),
        click.option("--mean", metavar="M[,M...]",
                     help="Normalise samples as (x - mean) / std (one value, or one per channel)."),
        click.option("--std", metavar="S[,S...]", help="See --mean."),
        click.option("--scale", type=click.FloatRange(min=0, min_open=True),
                     help="Normalise samples as x * scale (e.g. 0.00392 for 1/255)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for drawing samples (and for training)."),
    ])


class InputShape(click.ParamType):
    """``NAME:1xHxWxC``, ``NAME=1xHxWxC`` or ``1xHxWxC`` -> ``(name or None, shape)``."""

    name = "shape"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value)
        if "=" in text:  # the other spelling; a tensor name may itself hold ':' ("serving_default_x:0")
            name, _, dims = text.rpartition("=")
            text = f"{name}:{dims}" if name else dims
        from edgeq.calibration import parse_input_shape

        return parse_input_shape(text)


def shape_text(shape: tuple[Optional[str], tuple[int, ...]]) -> str:
    """``("image", (1, 8, 8, 3))`` -> ``"image=1x8x8x3"`` (the device runner's spelling)."""
    name, dims = shape
    text = "x".join(str(d) for d in dims)
    return f"{name}={text}" if name else text


def input_shape_option(f: F) -> F:
    """``--input-shape`` (repeatable; the parameter is ``input_shapes``, a tuple of ``(name, shape)``)."""
    return click.option(
        "--input-shape", "input_shapes", multiple=True, type=InputShape(), metavar="[NAME:]1xHxWxC",
        help="Shape for a model input with unknown dims, e.g. image:1x96x96x3 (NAME=1x96x96x3 works too; the "
             "name may be left out for a single input) [default: the data's samples, else the file's "
             "placeholder]. Repeatable.")(f)


# -- SSH --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SshArgs:
    """The SSH group as given on the command line."""

    identity: Optional[str] = None
    port: Optional[int] = None
    known_hosts: Optional[str] = None
    accept_new_host_key: bool = False
    connect_timeout: float = 10.0
    python: Optional[str] = None
    remote_dir: str = "~/.edgeq"

    def options(self) -> Any:
        """The transport's ``SSHOptions``; an encrypted key's passphrase comes from the environment, never argv."""
        from edgeq.transport import SSHOptions

        return SSHOptions(identity=self.identity, known_hosts=self.known_hosts,
                          accept_new_host_key=self.accept_new_host_key, connect_timeout=self.connect_timeout,
                          passphrase=os.environ.get(PASSPHRASE_ENV) or None)

    def host(self, spec: Optional[str]) -> Optional[str]:
        """``--host`` with ``-p`` applied (a port in the spec and a different ``-p`` is a usage error)."""
        from edgeq.errors import UsageError

        if self.port is None:
            return spec
        if spec is None:
            raise UsageError("-p/--port goes with --host", hint="an inventory sets ansible_port per host")
        from edgeq.transport import parse_host

        user, name, port = parse_host(spec)
        if port is not None and port != self.port:
            raise UsageError(f"--host {spec} names port {port} but -p says {self.port}", hint="give one of them")
        host = f"[{name}]" if ":" in name else name
        return (f"{user}@" if user else "") + f"{host}:{self.port}"


_SSH_KEYS = ("identity", "port", "known_hosts", "accept_new_host_key", "connect_timeout", "python", "remote_dir")


def ssh_options(f: F) -> F:
    """``-i/--identity``, ``-p/--port``, ``--known-hosts``, ``--accept-new-host-key``, ``--connect-timeout``,
    ``--python`` and ``--remote-dir``, passed on as ``ssh: SshArgs``."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kw: Any) -> Any:
        kw["ssh"] = SshArgs(**{k: kw.pop(k) for k in _SSH_KEYS})
        return f(*args, **kw)

    return _apply(wrapper, [
        click.option("-i", "--identity", type=click.Path(dir_okay=False), metavar="FILE",
                     help=f"SSH private key file [default: ssh-agent, ~/.ssh/config]. An encrypted key's "
                          f"passphrase is read from {PASSPHRASE_ENV}."),
        click.option("-p", "--port", type=click.IntRange(1, 65535),
                     help="SSH port of --host [default: the spec's :PORT, ~/.ssh/config, or 22]."),
        click.option("--known-hosts", type=click.Path(dir_okay=False), metavar="FILE",
                     help="known_hosts file [default: ~/.ssh/known_hosts]."),
        click.option("--accept-new-host-key", is_flag=True,
                     help="Record an unknown host key (like OpenSSH accept-new); a changed key is always refused."),
        click.option("--connect-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
                     metavar="SECONDS", help="Seconds for each of connect, SSH banner and authentication."),
        click.option("--python", "python", metavar="PATH",
                     help="Python on the device [default: python3; for this machine, the current interpreter]."),
        click.option("--remote-dir", default="~/.edgeq", show_default=True, metavar="DIR",
                     help="Directory on the device for models and data."),
    ])


def inventory_option(f: F) -> F:
    """``-I/--inventory FILE`` (each command's description says which of its hosts it uses)."""
    return click.option("-I", "--inventory", type=click.Path(dir_okay=False), metavar="FILE",
                        help="Ansible inventory (INI or YAML) of the devices; the command's description says "
                             "which hosts it uses.")(f)


# -- output -----------------------------------------------------------------------------------------------------

def output_file_option(what: str, required: bool = False, default: str = "") -> Callable[[F], F]:
    """``-o/--output FILE`` for commands that write one file (convert, qat): parent directories are created."""
    return click.option("-o", "--output", "output", required=required, type=click.Path(dir_okay=False),
                        metavar="FILE",
                        help=f"Output file: {what} (missing directories are created)" +
                             (f" [default: {default}]." if default else "."))


def output_dir_option(what: str, required: bool = False, default: str = "") -> Callable[[F], F]:
    """``-o/--output DIR`` for commands that write a directory (deploy, sweep, report, export)."""
    return click.option("-o", "--output", "output", required=required, type=click.Path(file_okay=False),
                        metavar="DIR",
                        help=f"Output directory: {what} (created if missing; one that already holds edgeq's "
                             f"files is replaced only with --force)" + (f" [default: {default}]." if default else "."))


def force_option(f: F) -> F:
    """``--force``."""
    return click.option("--force", is_flag=True,
                        help="Replace what edgeq wrote before in the output directory.")(f)


def json_option(f: F) -> F:
    """``--json`` (the parameter is ``as_json``)."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as one JSON document on stdout (with a \"schema\" field).")(f)


# -- device timeouts --------------------------------------------------------------------------------------------

_TIMEOUTS = (("probe", 120, "the probe and every short device step (lock, activate)"),
             ("upload", 600, "the whole upload, verification on the device included"),
             ("run", 900, "each run of a model on the device (timing and evaluation)"))


def timeout_options(f: F, only: tuple[str, ...] = ("probe", "upload", "run")) -> F:
    """``--probe-timeout``, ``--upload-timeout`` and ``--run-timeout`` (checked by ``check_options``: one line)."""
    return _apply(f, [
        click.option(f"--{name}-timeout", f"{name}_timeout", type=float, default=None, metavar="SECONDS",
                     help=f"Seconds for {what} [default: {default}; at most 86400]. An inventory's "
                          f"edgeq_{name}_timeout sets it per host.")
        for name, default, what in _TIMEOUTS if name in only])


def timeouts(probe_timeout: Optional[float] = None, upload_timeout: Optional[float] = None,
             run_timeout: Optional[float] = None) -> dict:
    """The timeouts given on the command line, as ``DeployOptions`` fields (the rest keep their defaults)."""
    given = {"probe_timeout": probe_timeout, "upload_timeout": upload_timeout, "run_timeout": run_timeout}
    return {k: v for k, v in given.items() if v is not None}


def probe_timeout_option(f: F) -> F:
    """``--probe-timeout`` alone (commands that only do short device steps, e.g. rollback)."""
    return timeout_options(f, only=("probe",))
